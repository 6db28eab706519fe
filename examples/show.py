"""Pretty-prints the JSON the quickstart gets back: `show.py receipt|consumed|status < json`."""

import json
import sys


def receipt(body):
    print("   committed {} users (rows read {}, skipped {})".format(
        body["users_accepted"], body["rows_read"], body["rows_skipped"]))
    for skipped in body["skipped"]:
        print("   skipped line {}: {}".format(skipped["line"], skipped["reason"]))


def consumed(body):
    print("   {} consumed of {} purchased (overage {})".format(
        body["total_seats_consumed"], body["total_seats_purchased"], body["total_seats_overage"]))
    for user in body["users"]:
        who = user["github_com_login"] or "(server only)"
        print("   {:<16} accounts={}  {}".format(
            who, user["total_user_accounts"], ", ".join(user["enterprise_server_user_ids"])))


def status(body):
    for instance in body["server_instances"]:
        print("   {:<20} {:<8} users={} via={} stale={}".format(
            instance["hostname"], instance["last_sync"]["status"], instance["user_count"],
            instance["arrival"], instance["stale"]))


if __name__ == "__main__":
    {"receipt": receipt, "consumed": consumed, "status": status}[sys.argv[1]](json.load(sys.stdin))
