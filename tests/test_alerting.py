"""Alerting end to end: a real master with real children, real SIGKILLs, the delivery helper
posting to a real HTTP receiver, and the CLI (`gearvisor alerts`, `gearvisor silence`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import HOST, REPO, free_port, wait_for
from test_notifier import Receiver as HttpReceiver
from test_notifier import alertmanager, smtp  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration


class Receiver(HttpReceiver):
    """test_notifier's HTTP receiver, read as Alertmanager webhook payloads."""

    @property
    def hook(self) -> str:
        return self.url + "/ok"

    @property
    def payloads(self) -> list[dict[str, Any]]:
        """Every POSTed payload, in order."""
        return [body for _, _, body in self.requests]

    def alerts(self, name: str, status: str) -> list[dict[str, Any]]:
        """The notified alerts named `name` in payloads of `status`."""
        return [a for p in self.payloads if p["status"] == status for a in p["alerts"]
                if a["labels"]["alertname"] == name]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


def fleet_config(gearmand: Any, receiver: Receiver) -> dict[str, Any]:
    return {"servers": [gearmand.address], "watch_config": False,
            "alerts": {"group_wait": "0.2s", "group_interval": "1s",
                       "rules": {"CrashLoop": {"count": 3, "window": "4s"}},
                       "routes": [{"match": {}, "notify": ["hook"]}],
                       "channels": {"hook": {"type": "webhook", "url": receiver.hook,
                                             "timeout": "5s"}}},
            "pools": {"w": {"processes": 1, "watch": False, "backoff": {"initial": 0.05},
                            "functions": {"echo": "examples.text:echo"}}}}


def kill_the_child(m: Any, gearmand: Any) -> None:
    """SIGKILL the pool's child once it is registered, and wait for its replacement."""
    pid = wait_for(lambda: m.child_with_title("w[0]"), timeout=20, message="a child")
    wait_for(lambda: len(gearmand.workers("w")) == 1, timeout=20, message="registered")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: m.child_with_title("w[0]") not in (None, pid), timeout=20,
             message="the replacement")


def test_a_crash_loop_is_notified_once_then_resolved(gearmand, master, receiver) -> None:
    config = fleet_config(gearmand, receiver)
    metrics_port = free_port()
    config["metrics"] = {"listen": f"{HOST}:{metrics_port}"}
    m = master(config)
    for _ in range(3):
        kill_the_child(m, gearmand)
    firing = wait_for(lambda: receiver.alerts("CrashLoop", "firing"), timeout=20,
                      message="CrashLoop posted to the webhook")
    labels = firing[0]["labels"]
    assert labels["pool"] == "w" and labels["severity"] and labels["host"]
    listed = json.loads(m.ctl("alerts", "--json", timeout=20).stdout)["alerts"]
    assert [a["labels"]["alertname"] for a in listed] == ["CrashLoop"]
    # No more crashes: after the window the alert resolves, and the receiver hears so.
    wait_for(lambda: receiver.alerts("CrashLoop", "resolved"), timeout=30,
             message="the resolved notice")
    assert len(receiver.alerts("CrashLoop", "firing")) == 1, receiver.payloads
    assert "no pending or firing alerts" in m.ctl("alerts", timeout=20).stdout
    delivered = 'gearvisor_alert_notifications_total{channel="hook",outcome="delivered"} 2.0'
    wait_for(lambda: delivered in urllib.request.urlopen(
        f"http://{HOST}:{metrics_port}/metrics", timeout=5).read().decode(), timeout=10,
        message="both notifications counted as delivered")


def test_silences_are_listed_expired_and_survive_a_restart(gearmand, master,
                                                           receiver) -> None:
    m = master(fleet_config(gearmand, receiver))
    wait_for(lambda: len(gearmand.workers("w")) == 1, timeout=20, message="registered")
    bad = m.ctl("silence", "add", "pool=w", timeout=20)
    assert bad.returncode == 2 and "--for" in bad.stderr
    added = m.ctl("silence", "add", "pool=w", "--for", "2h", "--comment", "deploy",
                  timeout=20)
    assert added.returncode == 0, added.stderr
    silence_id = added.stdout.split("id: ")[1].split()[0]
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    m.start()
    listed = wait_for(lambda: json.loads(m.ctl("silence", "list", "--json",
                                               timeout=20).stdout or "{}").get("silences"),
                      timeout=20, message="the silence after a restart")
    assert [(s["id"], s["state"], s["comment"]) for s in listed] == [
        (silence_id, "active", "deploy")]
    expired = m.ctl("silence", "expire", silence_id, timeout=20)
    assert expired.returncode == 0, expired.stderr
    again = json.loads(m.ctl("silence", "list", "--json", timeout=20).stdout)["silences"]
    assert [s["state"] for s in again] == ["expired"]
    unknown = m.ctl("silence", "expire", "nope", timeout=20)
    assert unknown.returncode == 1 and "no active or pending silence" in unknown.stderr
    # As typed by hand: the matchers after -c FILE (argparse alone refused them).
    typed = subprocess.run(
        [sys.executable, "-m", "gearvisor", "silence", "add", "-c", str(m.config_path),
         "function=echo", "pool=w", "--for", "10m"], capture_output=True, text=True,
        timeout=20, cwd=m.tmp, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert typed.returncode == 0, typed.stderr
    matchers = [s["matchers"] for s in json.loads(m.ctl("silence", "list", "--json",
                                                        timeout=20).stdout)["silences"]]
    assert ["function=echo", "pool=w"] in matchers


def test_a_stopped_gearmand_pages_server_down_once_and_resolves_when_it_is_back(
        gearmand, master, receiver) -> None:
    config = fleet_config(gearmand, receiver)
    config["probe_interval"] = "0.3s"
    master(config)
    wait_for(lambda: len(gearmand.workers("w")) == 1, timeout=20, message="registered")
    gearmand.stop()
    firing = wait_for(lambda: receiver.alerts("ServerDown", "firing"), timeout=20,
                      message="ServerDown posted")
    assert firing[0]["labels"]["server"] == gearmand.address
    assert firing[0]["labels"]["severity"] == "critical"
    gearmand.start()  # the same port, a new process
    wait_for(lambda: receiver.alerts("ServerDown", "resolved"), timeout=30,
             message="ServerDown resolved")
    assert len(receiver.alerts("ServerDown", "firing")) == 1, receiver.payloads
    wait_for(lambda: len(gearmand.workers("w")) == 1, timeout=20, message="registered again")


def test_alerts_test_sends_to_the_channel_from_the_cli(gearmand, master, receiver) -> None:
    m = master(fleet_config(gearmand, receiver), start=False)
    m.write_config(fleet_config(gearmand, receiver))
    out = m.ctl("alerts", "test", "hook", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "delivered" in out.stdout
    sent = wait_for(lambda: receiver.payloads, timeout=10, message="the test notification")
    assert sent[0]["alerts"][0]["labels"]["alertname"] == "GearvisorTest"
    missing = m.ctl("alerts", "test", "hoook", timeout=60)
    assert missing.returncode == 2 and "channels: hook" in missing.stderr


def test_a_ten_percent_failure_rate_pages_once_and_resolves_as_it_falls(
        gearmand, master, receiver, tmp_path) -> None:
    """Real jobs of one function: 18 succeed and 2 raise (10%, above FailureRate's 5%),
    counted by the children and sampled by the master; 40 more successes take it to 3%."""
    from conftest import write_module

    from gearvisor.gearman.client import Client

    write_module(tmp_path, "rated", """\
        def maybe(job):
            if job.data == b"fail":
                raise RuntimeError("fails on purpose")
            return b"ok"
        """)
    config = fleet_config(gearmand, receiver)
    config["metrics"] = {"listen": f"{HOST}:{free_port()}"}  # children count per function
    config["alerts"]["rules"] = {"FailureRate": {"ratio": 0.05, "window": "5m",
                                                 "min_jobs": 10, "for": "0s"}}
    config["pools"]["w"]["functions"] = {"maybe": "rated:maybe"}
    config["pools"]["w"]["processes"] = 2
    master(config)
    wait_for(lambda: len(gearmand.workers("w")) == 2, timeout=20, message="registered")
    with Client(HOST, gearmand.port, timeout=30) as c:
        c.wait([c.submit("maybe", b"ok") for _ in range(18)]
               + [c.submit("maybe", b"fail") for _ in range(2)])
    firing = wait_for(lambda: receiver.alerts("FailureRate", "firing"), timeout=40,
                      message="FailureRate posted")
    assert firing[0]["labels"]["function"] == "maybe" and firing[0]["labels"]["pool"] == "w"
    with Client(HOST, gearmand.port, timeout=30) as c:
        c.wait([c.submit("maybe", b"ok") for _ in range(40)])
    wait_for(lambda: receiver.alerts("FailureRate", "resolved"), timeout=40,
             message="FailureRate resolved under 5%")
    assert len(receiver.alerts("FailureRate", "firing")) == 1, receiver.payloads


def test_a_pool_that_cannot_boot_pages_boot_failure_until_its_code_is_there(
        gearmand, master, receiver, tmp_path) -> None:
    from conftest import write_module

    config = fleet_config(gearmand, receiver)
    config["pools"]["w"]["functions"] = {"f": "bootmod:f"}  # no such module yet
    master(config)
    firing = wait_for(lambda: receiver.alerts("BootFailure", "firing"), timeout=30,
                      message="BootFailure posted")
    assert firing[0]["labels"]["pool"] == "w"
    # Children import after fork: the next retry finds the module and boots.
    write_module(tmp_path, "bootmod", "def f(job):\n    return b'ok'\n")
    wait_for(lambda: receiver.alerts("BootFailure", "resolved"), timeout=60,
             message="BootFailure resolved once a child booted")
    assert len(receiver.alerts("BootFailure", "firing")) == 1, receiver.payloads


def test_a_poison_job_pages_once_and_resolves_after_its_hold(gearmand, master, receiver,
                                                             tmp_path) -> None:
    from conftest import write_module

    from gearvisor.gearman.client import Client

    write_module(tmp_path, "killer", "import os\n\ndef die(job):\n    os._exit(9)\n")
    config = fleet_config(gearmand, receiver)
    config["alerts"]["rules"] = {"PoisonJob": {"hold": "2s"}}
    config["pools"]["w"].update({"processes": 2, "poison_after": 1,
                                 "functions": {"die": "killer:die"}})
    master(config)
    wait_for(lambda: len(gearmand.workers("w")) == 2, timeout=20, message="registered")
    with Client(HOST, gearmand.port, timeout=30) as c:
        c.wait([c.submit("die", b"x")])  # kills one child, then is refused as poison
    firing = wait_for(lambda: receiver.alerts("PoisonJob", "firing"), timeout=30,
                      message="PoisonJob posted")
    assert firing[0]["labels"]["function"] == "die"
    wait_for(lambda: receiver.alerts("PoisonJob", "resolved"), timeout=30,
             message="PoisonJob resolved after its hold")
    assert len(receiver.alerts("PoisonJob", "firing")) == 1, receiver.payloads


def test_a_hung_job_killed_at_its_hard_timeout_pages_job_hung(gearmand, master, receiver,
                                                              tmp_path) -> None:
    from conftest import write_module

    from gearvisor.gearman.client import Client

    write_module(tmp_path, "hangs", """\
        import signal

        def hang(job):
            while True:  # ignores the soft timeout: only the hard one (SIGKILL) ends it
                try:
                    signal.pause()
                except BaseException:
                    pass
        """)
    config = fleet_config(gearmand, receiver)
    config["alerts"]["rules"] = {"JobHung": {"hold": "2s"}}
    config["pools"]["w"].update({"poison_after": 1, "timeout_grace": 0.2, "functions": {
        "hang": {"callable": "hangs:hang", "timeout": 0.3}}})
    master(config)
    wait_for(lambda: len(gearmand.workers("w")) == 1, timeout=20, message="registered")
    with Client(HOST, gearmand.port, timeout=30) as c:
        c.wait([c.submit("hang", b"x")])  # killed once, then refused as poison
    firing = wait_for(lambda: receiver.alerts("JobHung", "firing"), timeout=30,
                      message="JobHung posted")
    assert firing[0]["labels"]["pool"] == "w"
    wait_for(lambda: receiver.alerts("JobHung", "resolved"), timeout=30,
             message="JobHung resolved after its hold")
    assert len(receiver.alerts("JobHung", "firing")) == 1, receiver.payloads


def test_jobs_no_one_can_run_page_no_workers_until_a_pool_serves_them(
        gearmand, master, receiver) -> None:
    from gearvisor.gearman.client import Client

    config = fleet_config(gearmand, receiver)
    config["probe_interval"] = "0.3s"
    m = master(config)
    wait_for(lambda: len(gearmand.workers("w")) == 1, timeout=20, message="registered")
    with Client(HOST, gearmand.port, timeout=30) as c:
        c.submit_background("orphaned", b"x", unique="orphan-1")
    firing = wait_for(lambda: receiver.alerts("NoWorkers", "firing"), timeout=30,
                      message="NoWorkers posted")
    assert firing[0]["labels"]["function"] == "orphaned"
    config["pools"]["o"] = {"processes": 1, "watch": False,
                            "functions": {"orphaned": "examples.text:echo"}}
    m.write_config(config)
    m.signal(signal.SIGHUP)  # a reload adds the pool that serves it
    wait_for(lambda: receiver.alerts("NoWorkers", "resolved"), timeout=30,
             message="NoWorkers resolved")
    assert len(receiver.alerts("NoWorkers", "firing")) == 1, receiver.payloads


def test_a_storm_of_crashes_is_one_notification_for_the_group(gearmand, master,
                                                              receiver) -> None:
    """20 children SIGKILLed at once: 20 CrashLoop alerts (count 1: every slot's crash is
    one), one group (alertname, pool), so one notification listing them all."""
    n = 20
    config = fleet_config(gearmand, receiver)
    config["alerts"]["group_wait"] = "3s"  # the kills land well inside it
    config["alerts"]["rules"] = {"CrashLoop": {"count": 1, "window": "1m"}}
    config["pools"]["w"]["processes"] = n
    m = master(config)
    wait_for(lambda: len(gearmand.workers("w")) == n, timeout=60, message="all registered")
    workers = m.children()
    assert len(workers) == n  # the notifier helper is not among them
    for child in workers:
        os.kill(child.pid, signal.SIGKILL)
    first = wait_for(lambda: receiver.alerts("CrashLoop", "firing"), timeout=30,
                     message="the storm's notification")
    firing = [p for p in receiver.payloads if p["status"] == "firing"]
    assert len(firing) == 1, [len(p["alerts"]) for p in firing]
    assert len(first) == n and firing[0]["groupLabels"] == {"alertname": "CrashLoop",
                                                            "pool": "w"}
    assert len({a["labels"]["slot"] for a in first}) == n


def test_a_master_restart_does_not_page_again_for_what_still_fires(gearmand, master,
                                                                   receiver) -> None:
    """ServerDown fires; the master restarts while gearmand is still down, so the same
    alert fires again in the new master: its state (notified, when) comes back from
    state_dir, so no second page; the fix then resolves it, once."""
    config = fleet_config(gearmand, receiver)
    config["probe_interval"] = "0.3s"
    # the restored alerts are held until the probe's findings can be back: keep it short
    config["findings"] = {"registration_grace": "2s"}
    config["alerts"]["sample_interval"] = "1s"
    m = master(config)
    wait_for(lambda: len(gearmand.workers("w")) == 1, timeout=20, message="registered")
    gearmand.stop()
    wait_for(lambda: receiver.alerts("ServerDown", "firing"), timeout=20,
             message="ServerDown posted")
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    m.start()

    def firing_again() -> bool:
        out = m.ctl("alerts", "--json", timeout=20)
        return out.returncode == 0 and any(
            a["labels"]["alertname"] == "ServerDown" and a["state"] == "firing"
            for a in json.loads(out.stdout)["alerts"])

    wait_for(firing_again, timeout=20, message="ServerDown firing in the new master")
    gearmand.start()
    wait_for(lambda: receiver.alerts("ServerDown", "resolved"), timeout=30,
             message="ServerDown resolved")
    assert len(receiver.alerts("ServerDown", "firing")) == 1, [
        (p["status"], [(a["status"], a["labels"]["alertname"], a["startsAt"], a["endsAt"])
                       for a in p["alerts"]]) for p in receiver.payloads]


def test_a_crash_loop_reaches_a_real_smtp_server_and_a_real_alertmanager(
        gearmand, master, receiver, smtp, alertmanager, tmp_path) -> None:  # noqa: F811
    """The master's alerts through the email channel (aiosmtpd, STARTTLS and AUTH) and the
    alertmanager channel (prometheus-alertmanager's own /api/v2/alerts lists them)."""
    controller, box, cert = smtp
    password = tmp_path / "smtp.pass"
    password.write_text("s3cret\n")
    config = fleet_config(gearmand, receiver)
    config["alerts"]["routes"] = [{"match": {}, "notify": ["mail", "am"]}]
    config["alerts"]["channels"] = {
        "mail": {"type": "email", "to": ["ops@example.com"], "from": "gv@example.com",
                 "smtp": f"{HOST}:{controller.port}", "username": "gv",
                 "password_file": str(password), "ca_file": str(cert)},
        "am": {"type": "alertmanager", "url": alertmanager}}
    m = master(config)
    for _ in range(3):
        kill_the_child(m, gearmand)
    [mail] = wait_for(lambda: box.envelopes, timeout=30, message="the mail")
    text = mail.content.decode()
    assert "Subject: [FIRING:1] CrashLoop w" in text and mail.rcpt_tos == ["ops@example.com"]

    def in_alertmanager() -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{alertmanager}/api/v2/alerts", timeout=5) as r:
            return [a for a in json.loads(r.read()) if a["labels"]["alertname"] == "CrashLoop"]

    [listed] = wait_for(in_alertmanager, timeout=30, message="CrashLoop in Alertmanager")
    assert listed["labels"]["pool"] == "w" and listed["status"]["state"] == "active"


def test_a_notification_the_notifier_died_with_is_sent_again_by_the_next(
        gearmand, master, receiver) -> None:
    """The notifier is SIGKILLed while it posts a page (the receiver holds the request):
    the master held the notification until an outcome came, so the restarted notifier
    posts it again. At least once: a page is never lost to a helper crash."""
    config = fleet_config(gearmand, receiver)
    config["alerts"]["rules"]["CrashLoop"] = {"count": 1, "window": "30s"}
    config["alerts"]["channels"]["hook"]["url"] = receiver.url + "/hang"
    m = master(config)
    kill_the_child(m, gearmand)
    first = wait_for(lambda: [b for p, _, b in receiver.requests if p == "/hang"],
                     timeout=20, message="the page posted (and held by the receiver)")[0]

    def notifier() -> Any:
        return next((p for p in m.processes() if p.cmdline()[:1] == ["gearvisor: notifier"]),
                    None)

    dead = wait_for(notifier, message="the notifier")
    os.kill(dead.pid, signal.SIGKILL)
    again = wait_for(lambda: [b for p, _, b in receiver.requests
                              if p == "/hang" and b["groupKey"] == first["groupKey"]][1:],
                     timeout=30, message="the same page posted again by the next notifier")
    assert again[0]["status"] == "firing"
    assert notifier() is not None and notifier().pid != dead.pid
