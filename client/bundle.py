"""A site bundle (made by ``ccmr-server add-site``) and the checks a hospital's IT runs on it.

    BUNDLE/site.yaml   federation, site name and index, the SuperLink address
    BUNDLE/ca.crt      the federation's CA: the only authority trusted for the SuperLink
    BUNDLE/site.key    this site's private authentication key (owner-only)
    BUNDLE/site.pub    its public key (registered at the coordinator)

The recommended way (Flower's too) is that the key pair is made at the site (``ccmr-client keygen
DIR``) and only site.pub travels to the coordinator (``ccmr-server add-site FED NAME --public-key
site.pub``), which then sends back site.yaml and ca.crt for DIR: the coordinator never holds a key
that could impersonate the site. ``add-site`` without ``--public-key`` makes the pair itself.

Every check returns (ok, what it found or what to do), so ``ccmr-client check`` can say exactly
what is wrong.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from protocol.site_keys import BundleError, make_site_keys


def keygen(folder: str | Path, force: bool = False) -> Path:
    """Make this site's key pair in ``folder`` (site.key owner-only, site.pub to send); returns site.pub."""
    from ccmr_core.files import write_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    if (folder / "site.key").exists() and not force:
        raise BundleError(f"{folder / 'site.key'} exists; refusing to replace this site's key (pass --force to "
                          "make a new one, then send its site.pub to the coordinator again)")
    priv, pub = make_site_keys()
    write_atomic(folder / "site.key", priv, mode=0o600)
    write_atomic(folder / "site.pub", pub, mode=0o644)
    return folder / "site.pub"


@dataclass
class Bundle:
    root: Path
    federation: str
    site: str
    site_index: int
    superlink: str  # host:port

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    @property
    def key(self) -> Path:
        return self.root / "site.key"

    @property
    def host(self) -> str:
        return self.superlink.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.superlink.rsplit(":", 1)[1])


def load_bundle(root: str | Path) -> Bundle:
    root = Path(root).absolute()
    f = root / "site.yaml"
    if not f.is_file():
        raise BundleError(f"{root} is not a site bundle (no site.yaml); use the folder the coordinator sent "
                          "(made by `ccmr-server add-site`)")
    try:
        d = yaml.safe_load(f.read_text())
        b = Bundle(root, str(d["federation"]), str(d["site"]), int(d["site_index"]), str(d["superlink"]))
        b.port  # noqa: B018 - validates host:port
    except (KeyError, TypeError, ValueError, IndexError, yaml.YAMLError) as e:
        raise BundleError(f"{f} is damaged ({type(e).__name__}: {e}); ask the coordinator for a new bundle") from None
    for p in (b.ca, b.key):
        if not p.is_file():
            raise BundleError(f"{p} is missing; ask the coordinator for a new bundle")
    return b


def check_key(b: Bundle) -> tuple[bool, str]:
    mode = stat.S_IMODE(b.key.stat().st_mode)
    try:
        serialization.load_ssh_private_key(b.key.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        return False, f"{b.key} is not a readable OpenSSH private key ({e}); ask the coordinator for a new bundle"
    if mode & 0o077:
        return False, f"{b.key} is readable by others (mode {mode:o}); run: chmod 600 {b.key}"
    return True, f"private key {b.key.name} readable by its owner only"


def check_ca(b: Bundle, now: dt.datetime | None = None) -> tuple[bool, str]:
    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        c = x509.load_pem_x509_certificate(b.ca.read_bytes())
    except ValueError as e:
        return False, f"{b.ca} is not a PEM certificate ({e}); ask the coordinator for a new bundle"
    if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
        return False, (f"the federation CA is valid {c.not_valid_before_utc:%Y-%m-%d} to {c.not_valid_after_utc:%Y-%m-%d},"
                       f" not now ({now:%Y-%m-%d}); check this machine's clock or ask for a new bundle")
    return True, f"federation CA valid until {c.not_valid_after_utc:%Y-%m-%d}"


def check_superlink(b: Bundle, timeout: float = 5.0, now: dt.datetime | None = None) -> tuple[bool, str]:
    """Reach the SuperLink, verify its certificate against the bundle's CA and the host name, and
    its validity dates. Outbound only."""
    now = now or dt.datetime.now(dt.timezone.utc)
    ctx = ssl.create_default_context(cafile=str(b.ca))
    try:
        with socket.create_connection((b.host, b.port), timeout=timeout) as s:
            with ctx.wrap_socket(s, server_hostname=b.host) as t:
                der = t.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as e:
        return False, (f"the SuperLink at {b.superlink} answered, but its certificate does not check out "
                       f"({e.verify_message}); the address in site.yaml must be one the coordinator's certificate "
                       "names, and the bundle must come from this federation")
    except (socket.timeout, TimeoutError):
        return False, (f"no answer from {b.superlink} within {timeout:g} s; ask your network team to allow outbound "
                       f"TCP to {b.superlink} (no inbound port is needed)")
    except ConnectionRefusedError:
        return False, f"{b.superlink} refused the connection: the SuperLink is not running (ask the coordinator)"
    except OSError as e:
        return False, f"cannot reach {b.superlink} ({e}); check the host name, DNS and the outbound firewall"
    cert = x509.load_der_x509_certificate(der)
    left = cert.not_valid_after_utc - now
    if left.days < 14:
        return True, f"SuperLink reachable, certificate valid but expires in {left.days} days: tell the coordinator"
    return True, f"SuperLink {b.superlink} reachable over TLS; certificate valid until {cert.not_valid_after_utc:%Y-%m-%d}"


def check_gpu() -> tuple[bool, str]:
    import torch

    if torch.cuda.is_available():
        return True, f"GPU: {torch.cuda.get_device_name(0)} (training will use it)"
    return True, "no GPU found: training runs on the CPU (slower, but works)"
