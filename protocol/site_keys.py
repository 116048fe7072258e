"""A site's authentication key, as both sides handle it: the site makes the pair (``ccmr-client
keygen``), the coordinator registers the public half (``ccmr-server add-site --public-key``). Flower's
SuperNode authentication takes EC keys in OpenSSH format."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization


class BundleError(ValueError):
    pass


def make_site_keys() -> tuple[bytes, bytes]:
    """(private key, public key) of a site, EC P-384 in OpenSSH format (what Flower's SuperNode
    authentication accepts)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP384R1())
    priv = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                           serialization.NoEncryption())
    pub = k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return priv, pub


def check_public_key(data: bytes, source: str) -> bytes:
    """The site's public key as registered: one OpenSSH EC key (P-256/384/521), or an error naming
    the file and what to send instead (never a private key)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    text = data.strip()
    if b"PRIVATE KEY" in text:
        raise BundleError(f"{source} is a private key: send only site.pub (made by `ccmr-client keygen`); "
                          "make a new key pair, since this one has left the site")
    try:
        key = serialization.load_ssh_public_key(text)
    except (ValueError, TypeError) as e:
        raise BundleError(f"{source} is not an OpenSSH public key ({e}); send the site.pub that "
                          "`ccmr-client keygen` wrote") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise BundleError(f"{source} is a {type(key).__name__.removeprefix('_')}; Flower's SuperNode authentication "
                          "needs an EC key: make one with `ccmr-client keygen`")
    return text
