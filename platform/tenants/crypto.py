"""Encryption of secrets Parley must read back (a tenant's SSO client secret).

Fernet (AES-128-CBC with an HMAC-SHA256, from `cryptography`). The keys come from
PARLEY_ENCRYPTION_KEY: the first encrypts, every one decrypts, so a key is rotated by
putting the new one first. Without it, one key is derived from SECRET_KEY with HKDF
(so changing SECRET_KEY makes those secrets unreadable: they must be entered again).
"""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings

# Binds the derived key to this one use: another use of SECRET_KEY never yields it.
_HKDF_INFO = b"parley tenants.crypto fernet key v1"


class DecryptionError(Exception):
    """The ciphertext was not made with any of the configured keys (or was altered)."""


def _derived_key() -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO)
    return base64.urlsafe_b64encode(hkdf.derive(settings.SECRET_KEY.encode()))


def _fernet() -> MultiFernet:
    # Built on each call (cheap): settings overridden in tests take effect at once.
    keys = [key.encode() for key in settings.PARLEY_ENCRYPTION_KEY] or [_derived_key()]
    return MultiFernet([Fernet(key) for key in keys])


def encrypt(plaintext: str) -> str:
    """The ciphertext of `plaintext`, as text for a database column."""
    return _fernet().encrypt(plaintext.encode()).decode()


def decrypt(ciphertext: str) -> str:
    """The plaintext, or DecryptionError (never the ciphertext or a key in the message)."""
    try:
        return _fernet().decrypt(ciphertext.encode()).decode()
    except (InvalidToken, ValueError, TypeError):
        raise DecryptionError(
            "A stored secret cannot be decrypted with the configured keys "
            "(PARLEY_ENCRYPTION_KEY or SECRET_KEY changed?); enter it again."
        ) from None
