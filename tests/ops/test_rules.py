"""The shipped Prometheus rules: valid, unit-tested with `promtool test rules`, documented."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from promtool import promtool_run

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "compose" / "prometheus"
RULES = PROMETHEUS / "rules" / "kcp.yml"
RULE_TESTS = PROMETHEUS / "tests" / "kcp_test.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"

#: The alerts issue 16 asks for, at least.
REQUIRED = {
    "KcpAgentDown",
    "KcpKernelsBelowDesired",
    "KcpKernelCrashLooping",
    "KcpHighErrorRatio",
    "KcpQueueWaitHigh",
    "KcpJobsOrphaned",
    "KcpKernelsEjected",
    "KcpBusDeadLetters",
    "KcpBusPendingBacklog",
    "KcpRedisDown",
    "KcpNoLeader",
    "KcpTargetDown",
}


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings of `markdown`."""
    out = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


@pytest.mark.unit
@pytest.mark.timeout(60)
def test_rules_check_and_pass_their_unit_tests() -> None:
    assert "SUCCESS" in promtool_run("check", "rules", str(RULES))
    assert "SUCCESS" in promtool_run("test", "rules", str(RULE_TESTS.relative_to(PROMETHEUS)), cwd=PROMETHEUS)
    assert "SUCCESS" in promtool_run("check", "config", str(PROMETHEUS / "prometheus.yml"))


@pytest.mark.unit
@pytest.mark.timeout(30)
def test_every_alert_is_documented_tested_and_linked_to_the_runbook() -> None:
    rules = alerts()
    names = {rule["alert"] for rule in rules}
    assert names >= REQUIRED, sorted(REQUIRED - names)
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert names <= tested, f"alerts no promtool test sees firing: {sorted(names - tested)}"
    runbook = RUNBOOK.read_text()
    sections = anchors(runbook)
    for rule in rules:
        notes, name = rule["annotations"], rule["alert"]
        assert notes["summary"] and notes["description"], name
        assert "{{ $labels." in notes["summary"] + notes["description"] or not re.search(
            r"by \(|\{", rule["expr"]
        ), f"{name}: say which labels it fired for"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        path, _, anchor = notes["runbook_url"].partition("#")
        assert path == "docs/runbook.md" and anchor == name.lower() and anchor in sections, name
        section = runbook.split(f"## {name}", 1)[1].split("\n## ", 1)[0]
        for how in ("kcp status", "redis-cli", "dashboard"):
            assert how in section.lower(), f"runbook section {name} does not say how to confirm with {how}"
