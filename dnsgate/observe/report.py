"""Evidence: did any client resolve a tracker without consent? Built from the query log; pure.

Per client and gated vendor: queries, how many were sinkholed and how many answered for real,
first and last seen, and for every real answer the grant that allowed it (as recorded at that
moment). The verdict fails when
  - a real answer for a gated name has no recorded grant of the vendor's category in force at
    that time (the gate should make this impossible; the report checks rather than trusts),
  - a name on the catalog resolved without being gated at all (a domain switched off with
    gate.disabled_domains; seen only when the log keeps every query), or
  - the evidence is incomplete: the log is off, or entries were dropped in the window.
`junit` renders the same report for CI systems that read JUnit XML.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dnsgate.observe.events import iso

Row = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Watched:
    """A catalog pattern, for finding names that resolved without being gated."""

    pattern: str
    vendor: str
    category: str

    @property
    def apex(self) -> str:
        return self.pattern[2:] if self.pattern.startswith("*.") else self.pattern

    @property
    def subdomains_only(self) -> bool:
        return self.pattern.startswith("*.")

    def matches(self, name: str) -> bool:
        apex = self.apex
        return name.endswith("." + apex) or (not self.subdomains_only and name == apex)


def build_report(*, since: float, until: float, generated_at: float, mode: str, gated: Iterable[Row],
                 ungated: Iterable[Row], watched: Sequence[Watched], dropped: int,
                 vendor_names: Mapping[str, str], detail_limit: int = 1000) -> dict[str, Any]:
    clients: dict[str, dict[str, dict[str, Any]]] = {}
    violations: list[dict[str, Any]] = []
    totals = {"queries": 0, "sinkholed": 0, "allowed": 0, "servfail": 0}

    def pair(client: str, vendor: str, category: str) -> dict[str, Any]:
        vendors = clients.setdefault(client, {})
        if vendor not in vendors:
            vendors[vendor] = {"vendor": vendor, "name": vendor_names.get(vendor, vendor), "category": category,
                               "queries": 0, "sinkholed": 0, "allowed": 0, "servfail": 0, "first_seen": None,
                               "last_seen": None, "allowed_queries": [], "allowed_queries_truncated": False}
        return vendors[vendor]

    def seen(p: dict[str, Any], at: float) -> None:
        p["queries"] += 1
        totals["queries"] += 1
        p["first_seen"] = at if p["first_seen"] is None else min(p["first_seen"], at)
        p["last_seen"] = at if p["last_seen"] is None else max(p["last_seen"], at)

    for row in gated:
        p = pair(row["client"], row["vendor"], row["category"])
        seen(p, row["at"])
        outcome = row["outcome"]
        if outcome == "sinkholed":
            p["sinkholed"] += 1
            totals["sinkholed"] += 1
            continue
        if outcome not in ("cached", "forwarded"):  # servfail: nothing resolved
            p["servfail"] += 1
            totals["servfail"] += 1
            continue
        p["allowed"] += 1
        totals["allowed"] += 1
        consent = None
        if row["grant_source"] is not None:  # (an anonymous log keeps no grant times: null)
            consent = {"category": row["category"], "granted_at": iso(row["granted_at"]),
                       "expires_at": iso(row["grant_expires_at"]), "source": row["grant_source"]}
        if len(p["allowed_queries"]) < detail_limit:
            p["allowed_queries"].append({"at": iso(row["at"]), "name": row["name"], "type": row["type"],
                                         "outcome": outcome, "consent": consent})
        else:
            p["allowed_queries_truncated"] = True
        problem = _consent_problem(row)
        if problem is not None:
            violations.append(_violation(row, row["vendor"], problem, gated=True))

    for row in ungated:
        match = next((w for w in watched if w.matches(row["name"])), None)
        if match is None:
            continue
        p = pair(row["client"], match.vendor, match.category)
        seen(p, row["at"])
        p["allowed"] += 1
        totals["allowed"] += 1
        if len(p["allowed_queries"]) < detail_limit:
            p["allowed_queries"].append({"at": iso(row["at"]), "name": row["name"], "type": row["type"],
                                         "outcome": row["outcome"], "consent": None})
        violations.append(_violation(row, match.vendor, f"resolved without consent: {match.pattern!r} is not "
                                                         "gated in this deployment (gate.disabled_domains)",
                                     gated=False))

    problems: list[str] = []
    if mode == "off":
        problems.append("the query log is off (querylog.mode): there is no evidence")
    if dropped:
        problems.append(f"{dropped} query-log entries were dropped in this window: the evidence is incomplete")
    gated_count = sum(1 for v in violations if v["gated"])
    if gated_count:
        problems.append(f"{_queries(gated_count)} for gated names resolved without consent")
    if len(violations) > gated_count:
        problems.append(f"{_queries(len(violations) - gated_count)} for catalog names that this deployment does "
                        "not gate (gate.disabled_domains) resolved without consent")
    for vendors in clients.values():
        for p in vendors.values():
            p["first_seen"], p["last_seen"] = iso(p["first_seen"]), iso(p["last_seen"])
    return {
        "since": iso(since),
        "until": iso(until),
        "generated_at": iso(generated_at),
        "querylog": {"mode": mode, "dropped": dropped,
                     "covers_ungated_names": mode in ("full", "anonymous")},
        "verdict": "fail" if problems else "pass",
        "problems": problems,
        "totals": totals,
        "violations": violations,
        "clients": [{"client": client, "vendors": list(vendors.values())} for client, vendors in clients.items()],
    }


def _consent_problem(row: Row) -> str | None:
    at = row["at"]
    if row["grant_source"] is None:
        return f"resolved without a grant of category {row['category']!r}"
    if row["granted_at"] is None:  # an anonymous log: the grant was in force when dnsgate answered
        return None
    if row["granted_at"] > at + 1.0:  # 1 s: wall-clock steps between the two readings
        return "resolved before the grant it names was given"
    if row["grant_expires_at"] <= at:
        return f"resolved after the grant expired ({iso(row['grant_expires_at'])})"
    return None


def _queries(n: int) -> str:
    return f"{n} quer{'y' if n == 1 else 'ies'}"


def _violation(row: Row, vendor: str, reason: str, *, gated: bool) -> dict[str, Any]:
    return {"at": iso(row["at"]), "client": row["client"], "name": row["name"], "type": row["type"],
            "vendor": vendor, "gated": gated, "reason": reason}


def _class_name(client: str) -> str:
    """A JUnit class name part for a client: CI tools split class names at dots into packages, so an
    address's dots and colons become underscores (the test case's name keeps the address as it is)."""
    return "client_" + re.sub(r"[^A-Za-z0-9_-]", "_", client)


def junit(report: Mapping[str, Any]) -> str:
    """The report as JUnit XML: one test case per client and vendor, and one for the log's completeness."""
    import xml.etree.ElementTree as ET  # only this format needs it: not loaded in every server

    suite = ET.Element("testsuite", name="dnsgate consent evidence", timestamp=report["generated_at"] or "")
    props = ET.SubElement(suite, "properties")
    for key in ("since", "until"):
        ET.SubElement(props, "property", name=key, value=str(report[key]))
    ET.SubElement(props, "property", name="querylog.mode", value=report["querylog"]["mode"])
    cases: list[tuple[str, str, list[str], str]] = []
    by_pair: dict[tuple[str, str], list[str]] = {}
    for v in report["violations"]:
        by_pair.setdefault((v["client"], v["vendor"]), []).append(
            f"{v['at']} {v['name']} {v['type']}: {v['reason']}")
    for c in report["clients"]:
        for v in c["vendors"]:
            summary = (f"queries={v['queries']} sinkholed={v['sinkholed']} allowed={v['allowed']} "
                       f"first_seen={v['first_seen']} last_seen={v['last_seen']}")
            cases.append((f"dnsgate.evidence.{_class_name(c['client'])}",
                          f"{c['client']} {v['vendor']}: nothing resolved without consent",
                          by_pair.get((c["client"], v["vendor"]), []), summary))
    incomplete = [p for p in report["problems"] if "dropped" in p or "log is off" in p]
    cases.append(("dnsgate.evidence", "query log complete", incomplete, f"mode={report['querylog']['mode']}"))
    failures = 0
    for classname, name, problems, summary in cases:
        case = ET.SubElement(suite, "testcase", classname=classname, name=name)
        if problems:
            failures += 1
            failure = ET.SubElement(case, "failure", message=problems[0], type="ConsentViolation")
            failure.text = "\n".join(problems)
        ET.SubElement(case, "system-out").text = summary
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    root = ET.Element("testsuites", name="dnsgate", tests=str(len(cases)), failures=str(failures))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
