"""Running cfssl's ``multirootca`` as a central signer for one CA, safely.

Why multirootca and not ``cfssl serve`` (read in cfssl v1.6.5): ``cmd/multirootca/ca.go``
registers only ``/api/v1/cfssl/authsign``, ``/info`` and ``/metrics``, so ``newcert``,
``init_ca`` and the unauthenticated ``sign`` do not exist there; ``cmd/multirootca/api.go``
refuses an unknown profile ("invalid profile") where ``signer.Profile`` (used by ``cfssl
serve``) silently falls back to the default one, refuses a profile without ``auth_key``
("authorisation required"), and accepts ``prev_auth_key`` (``PrevProvider``); it serves TLS
(``-tls-cert``/``-tls-key``) and records every certificate in certdb (``dbconfig`` in its roots
file, ``multiroot/config/config.go``). ``name_whitelist`` is enforced by the local signer both
use (``signer/local/local.go``).

Rooms: :mod:`.authkeys` (per-role HMAC keys, rotation), :mod:`.policy` (profiles and name
rules), :mod:`.certdb` (the SQLite audit database), :mod:`.setup` (everything the signer reads,
written under the auth folder), :mod:`.info` (what a node needs to reach it), :mod:`.process`
(the foreground run).
"""
