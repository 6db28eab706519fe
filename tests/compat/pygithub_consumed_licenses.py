"""Reads consumed-licenses from a license-sync aggregator with PyGithub, the way an enterprise owner's script would.

Usage: pygithub_consumed_licenses.py BASE_URL TOKEN ENTERPRISE PER_PAGE
Prints one JSON object: the totals and every user PyGithub yielded while following the Link headers.
"""

import json
import sys

from github import Auth, Github


def main() -> None:
    base_url, token, enterprise, per_page = sys.argv[1:5]
    client = Github(base_url=base_url, auth=Auth.Token(token), per_page=int(per_page), retry=None)
    licenses = client.get_enterprise(enterprise).get_consumed_licenses(licence_users_per_page=int(per_page))
    users = list(licenses.users)
    print(
        json.dumps(
            {
                "total_seats_consumed": licenses.total_seats_consumed,
                "total_seats_purchased": licenses.total_seats_purchased,
                "users": [
                    {
                        "github_com_login": user.github_com_login,
                        "enterprise_server_user_ids": user.enterprise_server_user_ids,
                        "enterprise_server_primary_emails": user.enterprise_server_primary_emails,
                        "total_user_accounts": user.total_user_accounts,
                        "license_type": user.license_type,
                    }
                    for user in users
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
