//! [`Accounts`]: the GHES accounts of one instance as the merge keeps them in memory, in columns.
//!
//! The merged view holds every account of an enterprise (a million at the sizes issue #4 targets), so the layout
//! matters more than anywhere else: a [`ServerUser`] costs 96 bytes plus two heap strings (about 150 bytes), while
//! the merge and the REST answers only need the id, the login, the primary email and whether the account is
//! suspended or dormant. Here an account costs its id, two offsets and a flag byte (17 bytes) plus the text of its
//! login and email in one shared buffer, with no allocation of its own. The other fields (role, timestamps, two-factor)
//! stay in the store, where the agent's snapshot put them.

use crate::model::{ServerConsumption, ServerUser, consumption_of};

/// The accounts of one instance, in snapshot order; [`crate::merge::AccountRef::user`] indexes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accounts {
    ids: Vec<i64>,
    /// Every login and email back to back: account `i`'s login ends at `ends[2i]`, its email at `ends[2i + 1]`.
    text: String,
    ends: Vec<u32>,
    flags: Vec<u8>,
}

const SUSPENDED: u8 = 1;
const DORMANT: u8 = 2;

/// One account, borrowed from its [`Accounts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account<'a> {
    pub id: i64,
    pub login: &'a str,
    /// The primary email as GHES reports it (trimmed, not normalised).
    pub email: &'a str,
    pub suspended: bool,
    pub dormant: bool,
}

impl Account<'_> {
    /// Active or dormant accounts consume a license; suspended and built-in ones do not (SPEC §3).
    pub fn consumption(&self) -> ServerConsumption {
        consumption_of(self.login, self.suspended, self.dormant)
    }
}

/// The text of one instance's accounts passed 4 GiB, more than the offsets address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the logins and emails of one instance add up to more than 4 GiB; no real instance comes close, so check the \
     snapshot for corrupt rows"
)]
pub struct AccountsTooLarge;

impl Accounts {
    pub fn new() -> Self {
        Accounts::default()
    }

    /// Room for `accounts` accounts whose logins and emails total `text_bytes`.
    pub fn with_capacity(accounts: usize, text_bytes: usize) -> Self {
        Accounts {
            ids: Vec::with_capacity(accounts),
            text: String::with_capacity(text_bytes),
            ends: Vec::with_capacity(accounts * 2),
            flags: Vec::with_capacity(accounts),
        }
    }

    /// The accounts of a snapshot's users.
    pub fn from_users(users: &[ServerUser]) -> Result<Self, AccountsTooLarge> {
        let text_bytes = users
            .iter()
            .map(|user| user.login.len() + user.email.len())
            .sum();
        let mut accounts = Accounts::with_capacity(users.len(), text_bytes);
        for user in users {
            accounts.push(
                user.id,
                &user.login,
                &user.email,
                user.suspended,
                user.dormant,
            )?;
        }
        Ok(accounts)
    }

    pub fn push(
        &mut self,
        id: i64,
        login: &str,
        email: &str,
        suspended: bool,
        dormant: bool,
    ) -> Result<(), AccountsTooLarge> {
        let login_end = self.text.len() + login.len();
        let email_end = login_end + email.len();
        let (Ok(login_end), Ok(email_end)) = (u32::try_from(login_end), u32::try_from(email_end))
        else {
            return Err(AccountsTooLarge);
        };
        self.text.push_str(login);
        self.text.push_str(email);
        self.ends.extend([login_end, email_end]);
        self.ids.push(id);
        self.flags
            .push((u8::from(suspended) * SUSPENDED) | (u8::from(dormant) * DORMANT));
        Ok(())
    }

    /// Gives back spare capacity: a table is built once and then only read.
    pub fn shrink_to_fit(&mut self) {
        self.ids.shrink_to_fit();
        self.text.shrink_to_fit();
        self.ends.shrink_to_fit();
        self.flags.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn get(&self, index: usize) -> Option<Account<'_>> {
        let id = *self.ids.get(index)?;
        let start = match index {
            0 => 0,
            _ => self.ends[2 * index - 1] as usize,
        };
        let login_end = self.ends[2 * index] as usize;
        let email_end = self.ends[2 * index + 1] as usize;
        let flags = self.flags[index];
        Some(Account {
            id,
            login: &self.text[start..login_end],
            email: &self.text[login_end..email_end],
            suspended: flags & SUSPENDED != 0,
            dormant: flags & DORMANT != 0,
        })
    }

    /// The id of account `index`, reading only the id column: page writers and sorts touch one column, not four
    /// (each a likely cache miss at a million accounts). Panics when out of range, like slice indexing.
    pub fn id(&self, index: usize) -> i64 {
        self.ids[index]
    }

    /// The login of account `index`; panics when out of range.
    pub fn login(&self, index: usize) -> &str {
        let start = match index {
            0 => 0,
            _ => self.ends[2 * index - 1] as usize,
        };
        &self.text[start..self.ends[2 * index] as usize]
    }

    /// The primary email of account `index`; panics when out of range.
    pub fn email(&self, index: usize) -> &str {
        &self.text[self.ends[2 * index] as usize..self.ends[2 * index + 1] as usize]
    }

    /// Account `index`. Like slice indexing, an index out of range is a bug of the caller and panics.
    pub fn at(&self, index: usize) -> Account<'_> {
        match self.get(index) {
            Some(account) => account,
            None => panic!(
                "account index {index} out of range for an instance of {} accounts",
                self.len()
            ),
        }
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = Account<'_>> + '_ {
        (0..self.len()).map(|index| self.at(index))
    }

    /// The index of the account with this id (a linear scan: used to answer one lookup, not in loops).
    pub fn position_of_id(&self, id: i64) -> Option<usize> {
        self.ids.iter().position(|&known| known == id)
    }

    /// Heap bytes held, for the size test below.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.ids.capacity() * 8
            + self.text.capacity()
            + self.ends.capacity() * 4
            + self.flags.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::UserRole;

    fn user(id: i64, login: &str, email: &str, suspended: bool, dormant: bool) -> ServerUser {
        ServerUser {
            id,
            login: login.to_owned(),
            email: email.to_owned(),
            role: UserRole::User,
            suspended,
            dormant,
            created_at: None,
            last_active: None,
            two_factor_enabled: None,
        }
    }

    #[test]
    fn accounts_read_back_what_was_pushed() {
        let users = [
            user(7, "mona", "Mona@Example.com", false, false),
            user(3, "ghost", "", true, false),
            user(9, "héloïse", "h@example.org", false, true),
            user(1, "x", "", false, false),
        ];
        let accounts = Accounts::from_users(&users).expect("a small table");
        assert_eq!(accounts.len(), 4);
        for (account, user) in accounts.iter().zip(&users) {
            assert_eq!(account.id, user.id);
            assert_eq!(account.login, user.login);
            assert_eq!(account.email, user.email);
            assert_eq!(account.suspended, user.suspended);
            assert_eq!(account.dormant, user.dormant);
            assert_eq!(account.consumption(), user.consumption());
        }
        for (index, user) in users.iter().enumerate() {
            assert_eq!(accounts.id(index), user.id);
            assert_eq!(accounts.login(index), user.login);
            assert_eq!(accounts.email(index), user.email);
        }
        assert_eq!(accounts.get(4), None);
        assert_eq!(accounts.position_of_id(9), Some(2));
        assert_eq!(accounts.position_of_id(8), None);
    }

    #[test]
    fn an_empty_table_has_no_accounts() {
        let accounts = Accounts::from_users(&[]).expect("a small table");
        assert!(accounts.is_empty());
        assert_eq!(accounts.iter().count(), 0);
        assert_eq!(accounts.get(0), None);
    }

    #[test]
    fn an_account_costs_far_less_than_a_server_user() {
        let users: Vec<ServerUser> = (0..1000)
            .map(|id| {
                user(
                    id,
                    &format!("user{id}"),
                    &format!("person{id}@corp.example"),
                    false,
                    false,
                )
            })
            .collect();
        let mut accounts = Accounts::from_users(&users).expect("a small table");
        accounts.shrink_to_fit();
        // 17 bytes of columns plus the text itself (about 30 bytes here).
        assert!(
            accounts.heap_bytes() < 1000 * 50,
            "{}",
            accounts.heap_bytes()
        );
    }
}
