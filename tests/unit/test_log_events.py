"""The README's "Log events" table is the catalogue operators alert on: every event the
code logs is in it, with its level and its fields, and it lists nothing the code does not
log. The code side is read from the source (the first argument of every log call)."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "syncd"
LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
# structlog and the standard library log `exception()` at error level, with a traceback.
LEVEL_SHOWN = {"exception": "error"}
EVENT_NAME = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
LOGGER_BINDERS = {"bind", "new"}
LOGGER_FACTORIES = ("get_logger", "getLogger")


@dataclass
class Logged:
    levels: set[str] = field(default_factory=set)
    fields: set[str] = field(default_factory=set)
    places: list[str] = field(default_factory=list)


def _is_logger(node: ast.expr) -> bool:
    """`log`, `logger`, `self._log`, `logging`, a logger fetched in place
    (`logging.getLogger("syncd")`) or bound (`log.bind(chunk_id=1)`)."""
    if isinstance(node, ast.Name | ast.Attribute):
        name = node.id if isinstance(node, ast.Name) else node.attr
        return "log" in name.lower()
    if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in LOGGER_FACTORIES:
            return True
        return name in LOGGER_BINDERS and isinstance(func, ast.Attribute) and _is_logger(func.value)
    return False


def events_in_code() -> dict[str, Logged]:
    found: dict[str, Logged] = defaultdict(Logged)
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
                and _is_logger(node.func.value)
            ):
                continue
            place = f"{path.relative_to(ROOT)}:{node.lineno}"
            first = node.args[0] if node.args else None
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), (
                f"{place}: the event name must be a literal string (the catalogue checks it)"
            )
            assert EVENT_NAME.match(first.value), f"{place}: {first.value!r} is not snake_case"
            assert all(k.arg is not None for k in node.keywords), (
                f"{place}: fields must be named keywords (no **kwargs): the catalogue lists them"
            )
            logged = found[first.value]
            logged.levels.add(LEVEL_SHOWN.get(node.func.attr, node.func.attr))
            logged.fields |= {k.arg for k in node.keywords if k.arg is not None}
            logged.places.append(place)
    return dict(found)


def events_in_readme() -> dict[str, tuple[set[str], set[str]]]:
    """The rows of the table under the README heading "Log events": event -> (levels, fields)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    heading = re.search(r"^(#+) Log events\s*$", text, re.MULTILINE)
    assert heading, 'the README has no "Log events" section'
    rest = text[heading.end() :]
    end = re.search(rf"^#{{1,{len(heading.group(1))}}} ", rest, re.MULTILINE)
    section = rest[: end.start()] if end else rest
    rows: dict[str, tuple[set[str], set[str]]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 4:
            continue
        name = re.fullmatch(r"`([a-z0-9_]+)`", cells[0])
        if name is None:  # the header and the separator
            continue
        assert name.group(1) not in rows, f"{name.group(1)} is catalogued twice"
        levels = {level.strip() for level in cells[1].split(",")}
        rows[name.group(1)] = (levels, set(re.findall(r"`([a-z0-9_]+)`", cells[3])))
    assert rows, 'the "Log events" section has no table rows'
    return rows


def test_every_logged_event_is_catalogued_and_every_catalogued_event_is_logged() -> None:
    code = events_in_code()
    readme = events_in_readme()
    missing = {name: logged.places for name, logged in code.items() if name not in readme}
    assert missing == {}, "logged but not in the README's Log events table"
    assert sorted(set(readme) - set(code)) == [], "in the README's table but logged nowhere"


def test_the_catalogue_gives_each_event_its_level_and_fields() -> None:
    code = events_in_code()
    wrong = {
        name: {
            "code": (sorted(code[name].levels), sorted(code[name].fields)),
            "readme": (sorted(levels), sorted(fields)),
        }
        for name, (levels, fields) in events_in_readme().items()
        if name in code and (levels, fields) != (code[name].levels, code[name].fields)
    }
    assert wrong == {}


def test_the_finder_sees_every_kind_of_log_call() -> None:
    # The ways syncd logs today; a new way must be taught to events_in_code first.
    code = events_in_code()
    assert code["run_finished"].levels == {"info"}  # log = get_logger(__name__)
    assert code["sandbox_reset"].levels == {"info"}  # log = structlog.get_logger(__name__)
    assert code["unexpected_error"].levels == {"error"}  # logging.getLogger(...).exception
    assert {"identifiers", "nb_valid", "duration_ms"} <= code["chunk_pushed"].fields
