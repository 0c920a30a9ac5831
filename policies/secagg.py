"""Secure aggregation by pairwise masking (Bonawitz et al., CCS 2017), cross-silo form.

Both wings use this module: the sites to mask, the researcher to unmask the sum. Nothing here is
hand-made crypto: X25519 agreement, HKDF-SHA256, ChaCha20 as the PRG and Ed25519 signatures all
come from ``cryptography``; this module only fixes the messages and the arithmetic.

A round, for participants P (each a datasite, named by the SHA-256 fingerprint of its identity
key, the key syft signs with):

1. *mask*: site i quantizes its update x_i (clipped to L2 norm ``bound``) to fixed point in
   Z_2^32 and sends y_i = x_i + PRG(b_i) + sum_j s(i, j) PRG(k_ij), where b_i is a fresh self-mask
   seed, k_ij = HKDF(X25519(i, j), job, label) is shared with j alone, and s(i, j) = +1 if
   i's fingerprint sorts before j's, else -1. Pairwise masks cancel in the sum.
2. *sign*: every survivor S (the sites whose y arrived) signs (job, label, S). A site signs one
   survivor set per label, never a second.
3. *unmask*: given S and a signature of every member of S, site i reveals b_i and, for each
   participant d not in S, k_id. The sum over S of y, minus the self masks and the pairwise
   masks with the dropped sites, is sum x_i.

Why double masking: if the researcher claimed that site v dropped while it holds y_v, the
survivors' k_iv alone would strip v's pairwise masks; y_v still carries PRG(b_v), and v reveals
b_v only under a survivor set that contains v and that every member signed, which the others
cannot have signed (one set per label). So no individual x_i is ever exposed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from policies.errors import WireError

MAX_SITES = 64  # the fixed-point scale is chosen so that this many sites' sum cannot wrap
MODULUS = 1 << 32


def fingerprint(identity_public: bytes) -> str:
    """A datasite's name in a job's peer list: SHA-256 of its raw Ed25519 identity key."""
    return hashlib.sha256(identity_public).hexdigest()


def identity_of(seed_hex: str) -> Ed25519PrivateKey:
    """The site's identity key from ``identity.key`` (the ed25519 seed syft signs with)."""
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex))


def public_bytes(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def job_tag(job: dict[str, Any]) -> str:
    """What every signed message and every pair seed of a job is bound to: a SHA-256 of the
    whole approved job (plan, peers, noise, rate), not its id alone. A researcher who gives
    two sites different plans under one job id (red team: less noise at the others) gets keys
    that do not verify and masks that do not cancel."""
    canonical = json.dumps(job, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def key_message(tag: str, site: str, x25519_public: bytes) -> bytes:
    return f"fedsite-secagg-key|{tag}|{site}|{x25519_public.hex()}".encode()


def survivors_message(tag: str, label: str, survivors: list[str]) -> bytes:
    return f"fedsite-secagg-survivors|{tag}|{label}|{','.join(sorted(survivors))}".encode()


def verify(identity_public: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(identity_public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object, size: int | None = None) -> bytes:
    """Decode a base64 field, refusing what is not one (or not ``size`` bytes long)."""
    try:
        raw = base64.b64decode(str(text).encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise WireError("a secure-aggregation field is not base64") from exc
    if size is not None and len(raw) != size:
        raise WireError(f"a secure-aggregation key or seed is {len(raw)} bytes, not {size}")
    return raw


def pair_seed(  # noqa: PLR0913
    mine: X25519PrivateKey, peer_public: bytes, tag: str, label: str, me: str, peer: str
) -> bytes:
    """The seed of the mask shared by sites ``me`` and ``peer`` for one round: nobody else can
    derive it. The pair's fingerprints are in the derivation (red team: without them a colluder
    who claimed an honest peer's key as its own made a victim's two masks cancel)."""
    shared = mine.exchange(X25519PublicKey.from_public_bytes(peer_public))
    low, high = sorted((me, peer))
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=tag.encode(),
        info=f"fedsite-secagg-pair|{label}|{low}|{high}".encode(),
    ).derive(shared)


def prg(seed: bytes, size: int) -> npt.NDArray[np.uint32]:
    """``size`` uint32 words of ChaCha20 keystream under ``seed`` (a fresh key per use)."""
    cipher = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(cipher.update(b"\0" * (4 * size)), dtype="<u4").astype(np.uint32)


def pair_sign(me: str, peer: str) -> int:
    return 1 if me < peer else -1


def fraction_bits(bound: float) -> int:
    """Fixed-point fraction bits: MAX_SITES updates of L2 norm <= bound (each coordinate too),
    plus one unit of rounding each, sum below 2^31, so the signed sum never wraps."""
    return max(0, math.floor(math.log2((2**31 - 1 - MAX_SITES) / (MAX_SITES * bound))))


def quantize(
    update: npt.ArrayLike, bound: float, rng: np.random.Generator
) -> npt.NDArray[np.uint32]:
    """Clip to L2 norm ``bound``, scale to fixed point with stochastic rounding, as Z_2^32."""
    x = np.asarray(update, np.float64)
    norm = float(np.linalg.norm(x))
    if norm > bound:
        x = x * (bound / norm)
    scaled = x * (1 << fraction_bits(bound))
    q = np.floor(scaled + rng.random(x.size)).astype(np.int64)
    return (q % MODULUS).astype(np.uint32)


def dequantize(total: npt.NDArray[np.uint32], bound: float) -> npt.NDArray[np.floating[Any]]:
    """The signed sum of quantized updates, back to floats."""
    signed = total.astype(np.int64)
    signed[signed >= 1 << 31] -= MODULUS
    return signed.astype(np.float64) / (1 << fraction_bits(bound))


def mask(
    quantized: npt.NDArray[np.uint32], self_seed: bytes, pair_seeds: dict[str, bytes], me: str
) -> npt.NDArray[np.uint32]:
    """y = x + PRG(b) + sum of signed pairwise masks, in uint32 (wrapping) arithmetic."""
    y = quantized.astype(np.uint32) + prg(self_seed, quantized.size)
    for peer, seed in pair_seeds.items():
        stream = prg(seed, quantized.size)
        y = y + stream if pair_sign(me, peer) > 0 else y - stream
    return y


def unmask_sum(
    masked: list[npt.NDArray[np.uint32]],
    self_seeds: list[bytes],
    dropped: list[tuple[str, str, bytes]],
) -> npt.NDArray[np.uint32]:
    """Sum of the survivors' x from their y, their self seeds, and (survivor, dropped, seed)."""
    size = masked[0].size
    total = np.zeros(size, np.uint32)
    for y in masked:
        total = total + y
    for seed in self_seeds:
        total = total - prg(seed, size)
    for survivor, gone, seed in dropped:
        stream = prg(seed, size)
        total = total - stream if pair_sign(survivor, gone) > 0 else total + stream
    return total


def encode_vector(y: npt.ArrayLike) -> str:
    return b64(np.asarray(y, "<u4").tobytes())


def decode_vector(text: object, size: int) -> npt.NDArray[np.uint32]:
    raw = unb64(text, 4 * size)
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32)
