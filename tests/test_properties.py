"""Property-based tests: what the models accept, real cfssl accepts; what they reject never
reaches cfssl."""

from __future__ import annotations

import contextlib
import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cfwrap import cfssl, parsers, runner, tools
from cfwrap.cli import main
from cfwrap.models import SigningConfig, SigningProfile, parse_duration, to_cfssl_json
from cfwrap.nomad import check_dns_name, check_region
from cfwrap.specs import CertSpec, signing_config

LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)
REGION = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,49}[a-z0-9])?", fullmatch=True)  # CN <= 64
DNS_NAME = (
    st.lists(LABEL, min_size=2, max_size=4)
    .filter(lambda labels: not labels[-1].isdigit())  # an all-digit last label is refused
    .map(".".join)
    .filter(lambda n: len(n) <= 253)
)
SETTINGS = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _issue(kit: Path, spec: CertSpec, config: SigningConfig, tmp: Path) -> parsers.CertFacts:
    config_file = tmp / "cfssl.json"
    config_file.write_bytes(to_cfssl_json(config))
    call = cfssl.gencert(
        tools.find("cfssl"),
        ca_cert=kit / "ca.pem",
        ca_key=kit / "ca-key.pem",
        config_file=config_file,
        config=config,
        profile=spec.role,
        csr=spec.csr(),
    )
    issued = cfssl.parse_issued(runner.run(call))
    return parsers.read_certificate(issued.cert)


@SETTINGS
@given(region=REGION, names=st.lists(DNS_NAME, max_size=3, unique=True))
def test_accepted_names_are_issued_exactly_by_cfssl(kits, tmp_path_factory, region, names):
    assume(not any(n.endswith(".nomad") for n in names))
    spec = CertSpec(role="server", region=region, dns_names=tuple(names))
    facts = _issue(kits["global"], spec, signing_config([spec]), tmp_path_factory.mktemp("p"))
    assert facts.common_name == f"server.{region}.nomad"
    assert set(facts.dns_names) == {f"server.{region}.nomad", "localhost", *names}
    assert facts.ip_addresses == ("127.0.0.1",)


@settings(max_examples=10, deadline=None)
@given(hours=st.integers(min_value=1, max_value=262800))
def test_accepted_lifetimes_are_what_cfssl_issues(kits, tmp_path_factory, hours):
    spec = CertSpec(role="cli")
    profile = SigningProfile(usages=spec.profile().usages, expiry=f"{hours}h")
    config = SigningConfig.model_validate(
        {"signing": {"default": profile.model_dump(), "profiles": {"cli": profile.model_dump()}}}
    )
    facts = _issue(kits["global"], spec, config, tmp_path_factory.mktemp("p"))
    # cfssl backdates the start five minutes and counts the lifetime from there.
    assert facts.not_after - facts.not_before == timedelta(hours=hours)
    assert parse_duration(f"{hours}h") == timedelta(hours=hours)


@pytest.fixture(scope="module")
def recorder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A cfssl that only records that it was called: it must never be."""
    root = tmp_path_factory.mktemp("recorder")
    (root / "bin").mkdir()
    log = root / "called"
    fake = root / "bin" / "cfssl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 1\n')
    fake.chmod(0o755)
    (root / "package.json").write_text(json.dumps({"version": "1.6.5-recorder"}))
    return root / "bin", log


def _rejects(check: object, text: str) -> bool:
    try:
        check(text)  # type: ignore[operator]
    except ValueError:
        return True
    return False


def _run_quietly(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def _assert_refused_before_cfssl(
    recorder: tuple[Path, Path], tmp: Path, flag: str, value: str
) -> None:
    """``cfwrap quickstart FLAG VALUE`` exits 3 with one line naming the flag; cfssl never ran."""
    fake, log = recorder
    out = tmp / "kit"
    code, err = _run_quietly(
        ["--cfssl-dir", str(fake), "quickstart", "--out", str(out), flag, value]
    )
    assert code == 3
    assert err.startswith(f"cfwrap: error: {flag}")
    assert err.count("\n") == 1
    assert not log.exists()
    assert not out.exists()


@SETTINGS
@given(region=st.text(max_size=80))
def test_rejected_regions_never_reach_cfssl(recorder, tmp_path_factory, region):
    assume(_rejects(check_region, region) and not region.startswith("-"))
    _assert_refused_before_cfssl(recorder, tmp_path_factory.mktemp("q"), "--region", region)


@SETTINGS
@given(name=st.text(alphabet=st.sampled_from("abz09-.*/_ ÄA\\"), max_size=70))
def test_rejected_dns_names_never_reach_cfssl(recorder, tmp_path_factory, name):
    assume(_rejects(check_dns_name, name) and not name.startswith("-"))
    _assert_refused_before_cfssl(recorder, tmp_path_factory.mktemp("q"), "--dns", name)


@SETTINGS
@given(expiry=st.text(alphabet=st.sampled_from("0123456789hmsdy.-+ "), max_size=12))
def test_rejected_lifetimes_never_reach_cfssl(recorder, tmp_path_factory, expiry):
    assume(_rejects(parse_duration, expiry) and not expiry.startswith("-"))
    _assert_refused_before_cfssl(recorder, tmp_path_factory.mktemp("q"), "--expiry", expiry)
