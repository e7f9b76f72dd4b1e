"""The models and Nomad rules: what they build for cfssl, and what they refuse."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from cfwrap.models import CSR, KeySpec, SigningConfig, parse_duration, to_cfssl_json
from cfwrap.nomad import agent_hcl, parse_role_name
from cfwrap.specs import CASpec, CertSpec, signing_config, usages_for


def test_server_spec_builds_the_csr_nomad_needs():
    spec = CertSpec(
        role="server",
        region="eu-west-1",
        dns_names=("Nomad.Example.com",),
        ip_addresses=("10.0.0.1",),
    )
    csr = json.loads(to_cfssl_json(spec.csr()))
    assert csr == {
        "CN": "server.eu-west-1.nomad",
        "hosts": [
            "server.eu-west-1.nomad",
            "nomad.example.com",
            "localhost",
            "127.0.0.1",
            "10.0.0.1",
        ],
        "key": {"algo": "ecdsa", "size": 256},
        "names": [],
    }
    assert spec.stem == "eu-west-1-server-nomad"


def test_cli_spec_has_no_server_names():
    assert CertSpec(role="cli").hosts() == ("cli.global.nomad",)


@pytest.mark.parametrize(
    ("role", "algo", "expected"),
    [
        ("server", "ecdsa", ("digital signature", "server auth", "client auth")),
        ("client", "ecdsa", ("digital signature", "server auth", "client auth")),
        ("cli", "ecdsa", ("digital signature", "client auth")),
        ("server", "rsa", ("digital signature", "key encipherment", "server auth", "client auth")),
    ],
)
def test_usages_per_role_and_key(role, algo, expected):
    key = KeySpec(algo=algo, size=256 if algo == "ecdsa" else 2048)
    assert usages_for(role, key) == expected


def test_signing_config_default_profile_is_the_narrowest():
    specs = [CertSpec(role=r) for r in ("server", "client", "cli")]
    config = signing_config(specs)
    assert set(config.signing.profiles) == {"server", "client", "cli"}
    assert config.signing.default.usages == ("digital signature", "client auth")
    round_trip = SigningConfig.model_validate_json(to_cfssl_json(config))
    assert round_trip == config


def test_ca_spec_is_five_years_pathlen_zero():
    csr = json.loads(to_cfssl_json(CASpec().csr()))
    assert csr["ca"] == {"expiry": "43800h", "pathlen": 0, "pathlenzero": True}
    assert "hosts" not in csr or csr["hosts"] == []


@pytest.mark.parametrize(
    "bad",
    [
        {"CN": "x", "hots": []},
        {"CN": "x", "key": {"algo": "rsa"}},
        {"CN": "x", "key": {"algo": "ed25519"}},
        {"CN": ""},
    ],
)
def test_csr_refuses_what_cfssl_would_ignore_or_misread(bad):
    with pytest.raises(ValidationError):
        CSR.model_validate(bad)


def test_signing_config_refuses_unknown_usages():
    with pytest.raises(ValidationError):
        SigningConfig.model_validate(
            {"signing": {"default": {"usages": ["server authentication"], "expiry": "8760h"}}}
        )


@pytest.mark.parametrize(("text", "hours"), [("8760h", 8760), ("1h30m", 1.5), ("90m", 1.5)])
def test_durations(text, hours):
    assert parse_duration(text).total_seconds() == hours * 3600


@pytest.mark.parametrize("text", ["-1h", "abc", "1y", "1d", "0h", "30m", "", "8760", "999999h"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_role_names():
    assert parse_role_name("server.global.nomad") == ("server", "global")
    assert parse_role_name("client.eu-west-1.nomad") == ("client", "eu-west-1")
    assert parse_role_name("server.regionglobal.nomad") == ("server", "regionglobal")
    assert parse_role_name("regionglobal.nomad") is None
    assert parse_role_name("nomad.example.com") is None


def test_hcl_strings_are_escaped_and_read_back():
    from cfwrap.nomad import parse_hcl

    text = agent_hcl("client", region="global", ca_file='/a"b\\c', cert_file="c", key_file="k")
    assert 'ca_file   = "/a\\"b\\\\c"' in text
    assert parse_hcl(text)["tls"][0]["ca_file"] == '/a"b\\c'


@pytest.mark.parametrize("path", ["/a\nhttp = false", "/a\r", "/x/${y}", "/x/%{y}", "/a\x00"])
def test_hcl_values_that_would_change_the_config_are_refused(path):
    with pytest.raises(ValueError, match="ca_file contains"):
        agent_hcl("client", region="global", ca_file=path, cert_file="c", key_file="k")


def test_kit_file_names():
    from pathlib import Path

    from cfwrap.cfssl import key_path
    from cfwrap.nomad import parse_file_stem

    assert parse_file_stem("eu-west-1-server-nomad") == ("server", "eu-west-1")
    assert parse_file_stem("global-cli") == ("cli", "global")
    assert parse_file_stem("nomad") is None
    assert key_path(Path("/k/global-client-nomad.pem")) == Path("/k/global-client-nomad-key.pem")
    assert key_path(Path("ca.pem")) == Path("ca-key.pem")
