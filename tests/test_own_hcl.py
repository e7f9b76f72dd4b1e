"""The reader of cfwrap's own agent HCL, held to python-hcl2: whatever it accepts, HCL2 reads alike.

``nomad.read_own_hcl`` replaces python-hcl2 for the read-back of the HCL a kit writes (building
hcl2's parser costs most of a quickstart's run). It is only as good as its agreement with a real
HCL parser, so these tests generate texts, hostile ones included, and compare.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cfwrap.nomad import HclSyntaxError, agent_hcl, parse_hcl, read_own_hcl

SETTINGS = settings(max_examples=300, deadline=None)

# Characters that matter to HCL's strings and structure, and some that do not.
TRICKY = st.sampled_from(
    ['"', "\\", "$", "%", "{", "}", "#", "/", "*", "=", " ", "\t", "\n", "\r", "\x00", "\x85",
     "\u2028", "é", "☃", "a", "_", "-", ".", "0", "true", "null", "${", "%{", "$${", "\\\\",
     '\\"', "\\n", "\\u0041"]
)  # fmt: skip
VALUE = st.lists(TRICKY, max_size=12).map("".join) | st.text(max_size=20)
NAME = st.sampled_from(["a", "ca_file", "tls", "server", "true", "null", "for", "x-y", "_a", "A"])
SPACE = st.sampled_from(["", " ", "  "])


def _quoted(value: str) -> str:
    """A string as agent_hcl escapes it."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


@st.composite
def hcl_line(draw: st.DrawFn) -> str:
    """A line that is often in the subset cfwrap writes, and often just outside it."""
    indent, gap, name, value = draw(SPACE), draw(SPACE), draw(NAME), draw(VALUE)
    string = _quoted(value) if draw(st.booleans()) else f'"{value}"'
    boolean = draw(st.sampled_from(["true", "false", "1"]))
    comment = draw(st.sampled_from(["#", "//"])) + value
    return draw(
        st.sampled_from(
            [
                f"{indent}{name}{gap}={gap}{string}{draw(SPACE)}",
                f"{indent}{name}{gap}={gap}{boolean}",
                f"{indent}{name}{draw(SPACE)}{{",
                f"{indent}}}",
                f"{indent}{comment}",
                indent,
                value,
            ]
        )
    )


SAFE_VALUE = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=12) | VALUE


def _attribute(name: str, value: str | bool, indent: str) -> str:
    shown = str(value).lower() if isinstance(value, bool) else _quoted(value)
    return f"{indent}{name} = {shown}"


@st.composite
def hcl_document(draw: st.DrawFn) -> list[str]:
    """A document in the subset (attributes, one level of blocks), with a line or two changed."""
    attributes = st.dictionaries(
        st.sampled_from(["region", "ca_file", "http", "encrypt", "a"]),
        SAFE_VALUE | st.booleans(),
        max_size=3,
    )
    lines = [_attribute(n, v, "") for n, v in draw(attributes).items()]
    for block in draw(st.lists(st.sampled_from(["tls", "server", "client"]), max_size=3)):
        lines.append(f"{block} {{")
        lines += [_attribute(n, v, draw(SPACE)) for n, v in draw(attributes).items()]
        lines.append("}")
    for _ in range(draw(st.integers(0, 2))):
        if lines:
            lines[draw(st.integers(0, len(lines) - 1))] = draw(hcl_line())
    return lines


@SETTINGS
@given(lines=st.lists(hcl_line(), max_size=8) | hcl_document())
def test_what_the_own_reader_accepts_hcl2_reads_the_same(lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    try:
        ours = read_own_hcl(text)
    except HclSyntaxError:
        return  # refusing is always allowed: the read-back then fails loudly
    assert parse_hcl(text) == ours


@SETTINGS
@given(
    role=st.sampled_from(["server", "client"]),
    ca_file=VALUE,
    cert_file=VALUE,
    key_file=st.sampled_from(["/etc/nomad.d/tls/k.pem", "k"]),
)
def test_rendered_configs_read_back_alike_or_are_refused(
    role: str, ca_file: str, cert_file: str, key_file: str
) -> None:
    try:
        text = agent_hcl(
            role,  # type: ignore[arg-type] # sampled from the two roles
            region="global",
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            gossip_key="c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MDA=" if role == "server" else None,
        )
    except ValueError:
        return
    data = parse_hcl(text)
    assert data == read_own_hcl(text)
    assert data["tls"][0]["ca_file"] == ca_file
    assert data["tls"][0]["cert_file"] == cert_file


@pytest.mark.parametrize(
    "text",
    [
        'a = "x${y}"\n',  # a template: HCL2 would substitute it
        'a = "x%{if y}z%{endif}"\n',
        'a = "x\\ny"\n',  # an escape cfwrap never writes
        'a = "x"\na = "y"\n',  # hcl2 keeps the last; which one Nomad keeps is not ours to guess
        "b {\nc {\n}\n}\n",
        "b {\n",
        "}\n",
        'a = "x" # trailing comment\n',
        "// another comment style\n",
        'a = "x\x85"\n',
        'a\t= "x"\n',
        'a = "x"y"\n',
        'a = "x\\"\n',
        'a = "x"\na {\n}\n',
    ],
)
def test_the_own_reader_refuses_what_cfwrap_never_writes(text: str) -> None:
    with pytest.raises(HclSyntaxError, match="not the HCL cfwrap writes"):
        read_own_hcl(text)


def test_the_own_reader_never_quotes_the_text() -> None:
    with pytest.raises(HclSyntaxError) as e:
        read_own_hcl('encrypt = "c2VjcmV0${x}"\n')
    assert "c2Vj" not in str(e.value)
