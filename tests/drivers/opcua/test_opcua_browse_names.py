"""What `browse` writes, without a server: tag names from browse paths, scalars the loader reads back as written."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.config import parse_config
from edge_agent.drivers.base import TAG_NAME
from edge_agent.drivers.opcua.browse import Variable, Walk, render, tag_names


def test_names_are_sanitised_and_unique() -> None:
    paths = [
        ("Line 1", "Temp (°C)"),
        ("Line/1", "Temp (°C)"),  # sanitises to the same name: _2
        ("Line_1", "Temp_C"),  # and so does this one: _3
        ("2nd",),  # a name must start with a letter or _
        ("°",),  # nothing left
        ("Motor.Speed", "rpm"),
        ("Temp_C_2",),
    ]
    assert tag_names(paths) == [
        "Line_1.Temp_C",
        "Line_1.Temp_C_2",
        "Line_1.Temp_C_3",
        "_2nd",
        "_",
        "Motor.Speed.rpm",
        "Temp_C_2",
    ]


@given(st.lists(st.lists(st.text(max_size=12), min_size=1, max_size=4).map(tuple), max_size=30))
def test_any_browse_paths_give_valid_unique_names(paths: list[tuple[str, ...]]) -> None:
    names = tag_names(paths)
    assert len(set(names)) == len(names) == len(paths)
    assert all(TAG_NAME.match(n) for n in names)


TRICKY = ["bar", "°C", "yes", "no", "null", "~", "1e3", "0x10", "2s", ".nan", "a: b", "#x", "-", "a,b", "{x}",
          "$HOME", "${HOME}", "$$", "it's", 'say "hi"', "tab\there", "line\u2028sep", "nbsp\u00a0", "😀", "",
          "/var/lib/pki", "../pki/agent.der"]  # fmt: skip


@pytest.mark.parametrize("text", TRICKY)
def test_strings_are_read_back_as_they_were(text: str) -> None:
    """Units, names and paths are written plain where YAML keeps them strings, quoted (and $ doubled) elsewhere."""
    node = f"nsu=urn:x;s={text or 'empty'}"
    walk = Walk("i=85", 6, "Objects", [Variable(("Tag",), node, "Double", text or None)], nodes=1)
    cfg = parse_config(render(walk, {"name": "dev", "type": "opcua", "endpoint": "opc.tcp://h:4840"}, command="t"))
    tag = cfg.devices[0].tags[0]
    assert (tag.unit, str(tag.node)) == (text or None, node)  # type: ignore[attr-defined]


def test_the_section_lists_tags_and_comments_the_rest() -> None:
    walk = Walk(
        "i=85",
        6,
        "Objects",
        [
            Variable(("A", "Flow"), "nsu=urn:x;s=A.Flow", "Double", "m3/h"),
            Variable(("A", "Speeds"), "nsu=urn:x;s=A.Speeds", "Float[4]", None, "an array of 4", 4),
            Variable(("A", "Flow"), "nsu=urn:x;s=A.Flow2", "Double", None, "reads BadSensorFailure now (bad)"),
        ],
        nodes=4,
        below=2,
        limit_hit=True,
        skipped_standard=True,
    )
    text = render(walk, {"name": "dev", "type": "opcua", "endpoint": "opc.tcp://h:4840", "timeout": "2s"}, command="c")
    assert text.splitlines()[:7] == [
        "# c",
        "# 4 nodes under Objects (i=85) to depth 6: 3 variables, 1 tag, 2 listed as comments",
        "# The standard's own nodes under Objects (Server, Aliases, Locations) are left out: --root i=2253",
        "# walks the Server object.",
        "# 2 nodes lie below depth 6, not walked: raise --depth.",
        "# The walk stopped at --max-nodes: raise it, or walk a part with --root.",
        "devices:",
    ]
    assert text.splitlines()[-4:] == [
        '      - {name: A.Flow, node: "nsu=urn:x;s=A.Flow", unit: m3/h}  # Double',
        "      # Variables that are not tags: `read` would not find them good as they are.",
        '      # - {name: A.Speeds, node: "nsu=urn:x;s=A.Speeds", index: 0}  # Float[4]: an array of 4',
        '      # - {name: A.Flow_2, node: "nsu=urn:x;s=A.Flow2"}  # Double: reads BadSensorFailure now (bad)',
    ]
    dev = parse_config(text).devices[0]
    assert [(t.name, t.unit) for t in dev.tags] == [("A.Flow", "m3/h")]
    assert dev.timeout == 2.0
