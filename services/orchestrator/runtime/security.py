"""Transport security from config: each stage's TLS credentials (re-read when their files change), the
credentials a caller shows its callee, and the check of a caller's certificate under mutual TLS.

Trust boundaries (ARCHITECTURE.md): the edge faces clients, with TLS and optionally client certificates from
``tls.client_ca_file``; every hop between stages is mutual TLS under ``tls.ca_file``, the callee's certificate
naming the callee's stage and the caller's naming the caller's, so a stage takes calls only from the one stage
the graph says calls it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from orchestrator.core.calls import Options
from orchestrator.core.config import TlsConfig
from orchestrator.core.errors import PermissionDenied
from orchestrator.core.graph import CALLEE, EDGE

log = logging.getLogger(__name__)

# Which stage calls each stage: a stage's callers must hold a certificate naming it.
CALLER = {callee: caller for caller, callee in CALLEE.items()}


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def files_stamp(files: Sequence[str]) -> tuple[tuple[int, int, int], ...]:
    """What changes when any of ``files`` is rewritten or replaced (a Kubernetes Secret swaps a symlink)."""
    out = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            out.append((0, 0, 0))
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def caller_files(tls: TlsConfig, caller: str) -> tuple[str, ...]:
    """The files a caller's channel credentials are made from."""
    return (*tls.files(caller), tls.ca_file) if tls.enabled else ()


class CertificateFiles:
    """A server's certificate, key and client CA, read again when any of the files changes.

    gRPC asks for the configuration at every new connection's handshake; a stat of three files answers "unchanged"
    cheaply, so a rotated certificate (a Kubernetes Secret update, cert-manager renewing) is served to the next
    connection without a restart, while connections already open keep theirs. ``reload()`` (SIGHUP) forces a read.
    """

    def __init__(self, cert_file: str, key_file: str, ca_file: str, *, require_client_cert: bool) -> None:
        self.files = tuple(f for f in (cert_file, key_file, ca_file) if f)
        self._cert_file, self._key_file, self._ca_file = cert_file, key_file, ca_file
        self.require_client_cert = require_client_cert
        self._stamp = files_stamp(self.files)
        self._initial = self._configuration()  # raises OSError: a stage without its certificate does not start
        self._forced = False
        self.reloads = 0
        self._twins: list[CertificateFiles] = []

    def _configuration(self) -> Any:
        ca = _read(self._ca_file) if self._ca_file else None
        pair = (_read(self._key_file), _read(self._cert_file))
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)

    def reload(self) -> None:
        self._forced = True
        for twin in self._twins:
            twin.reload()

    def twin(self) -> CertificateFiles:
        """The same files for another listener: each gRPC server asks its own fetcher, which keeps its own state."""
        twin = CertificateFiles(
            self._cert_file, self._key_file, self._ca_file, require_client_cert=self.require_client_cert
        )
        self._twins.append(twin)
        return twin

    def _fetch(self) -> Any:
        """gRPC's fetcher: a new configuration, or None to keep the current one."""
        stamp = files_stamp(self.files)
        if stamp == self._stamp and not self._forced:
            return None
        self._forced = False
        try:
            config = self._configuration()
        except OSError as exc:  # mid-rotation or removed: keep serving the certificate we have
            log.error("TLS files unreadable, keeping the current certificate: %s", exc)
            return None
        self._stamp = stamp
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self._cert_file)
        return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self.require_client_cert
        )


def server_certificates(tls: TlsConfig, stage: str) -> CertificateFiles | None:
    """What ``stage`` serves: None for plaintext. The edge checks its clients' certificates against
    ``tls.client_ca_file`` when set; every other stage requires a caller's certificate signed by ``tls.ca_file``."""
    if not tls.enabled:
        return None
    cert, key = tls.files(stage)
    if stage == EDGE:
        return CertificateFiles(cert, key, tls.client_ca_file, require_client_cert=bool(tls.client_ca_file))
    return CertificateFiles(cert, key, tls.ca_file, require_client_cert=True)


def channel_credentials(tls: TlsConfig, caller: str) -> grpc.ChannelCredentials | None:
    """What ``caller`` shows its callee and checks it against: None for plaintext."""
    if not tls.enabled:
        return None
    cert, key = tls.files(caller)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file), private_key=_read(key), certificate_chain=_read(cert)
    )


def callee_name_options(tls: TlsConfig, callee: str) -> Options:
    """Check that the callee's certificate names its stage, whatever address it was reached at."""
    if not tls.enabled or not tls.check_names:
        return ()
    return (("grpc.ssl_target_name_override", callee),)


def certificate_names(auth_context: Mapping[str, Sequence[bytes]]) -> set[str]:
    """The DNS names (and common name) a verified peer certificate carries."""
    names = auth_context.get("x509_subject_alternative_name", ()) or ()
    common = auth_context.get("x509_common_name", ()) or ()
    return {n.decode(errors="replace") for n in (*names, *common)}


class PeerCheck:
    """Under mutual TLS with ``tls.check_names``, a stage below the edge takes calls only from the stage that
    calls it in the graph: gRPC has checked the certificate's signature, this checks whose it is."""

    def __init__(self, tls: TlsConfig, stage: str) -> None:
        self.expected = CALLER.get(stage, "")
        self.active = tls.enabled and tls.check_names and stage != EDGE and bool(self.expected)
        self._stage = stage

    def check(self, auth_context: Mapping[str, Sequence[bytes]]) -> None:
        if not self.active:
            return
        if self.expected not in certificate_names(auth_context):
            raise PermissionDenied(
                f"the {self._stage} stage takes calls only from the {self.expected} stage", stage=self._stage
            )


def operator_channel(tls: TlsConfig, address: str, stage: str | None = None) -> grpc.Channel:
    """A blocking channel for the operator's tools (launcher health checks, ``orchestrator status``) to the
    ``stage`` process at ``address`` (None: a stage not known by name, checked by its address): under TLS with the
    edge's certificate, which every stage's CA trusts."""
    credentials = channel_credentials(tls, EDGE)
    if credentials is None:
        return grpc.insecure_channel(address)
    options = callee_name_options(tls, stage) if stage else ()
    return grpc.secure_channel(address, credentials, options=options)
