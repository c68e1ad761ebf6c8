"""The demo's app: a few handlers, as a small web app would register them."""

import random
import time

from jobrunner import JobRunner

jobs = JobRunner("sqlite:///var/demo.db", delay=0.2)


@jobs.handler("send_email", queue="async", max_retries=3)
def send_email(to, subject="hello"):
    time.sleep(0.002)  # pretend to talk to an SMTP server
    print("  sent %r to %s" % (subject, to))


@jobs.handler(queue="high")
def charge_card(order_id, cents):
    print("  charged order %s: %d.%02d EUR" % (order_id, cents // 100, cents % 100))


@jobs.handler(max_retries=2)
def flaky_webhook(url):
    if random.random() < 0.5:
        raise ConnectionError("%s did not answer" % url)
    print("  webhook %s answered" % url)
