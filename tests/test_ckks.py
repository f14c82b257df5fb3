"""Tests for fedguard.secure.ckks (TenSEAL CKKS aggregation)."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts

from fedguard.secure.ckks import (
    CKKSContextConfig,
    CKKSEncryptor,
    CKKSError,
    CKKSKeyHolder,
    EncryptedVector,
    add_encrypted,
    create_secret_context,
    decrypt_vector,
    encrypt_vector,
    load_public_context,
    num_ciphertexts,
)


@pytest.fixture(scope="module")
def holder() -> CKKSKeyHolder:
    return CKKSKeyHolder()


@pytest.fixture(scope="module")
def encryptor(holder: CKKSKeyHolder) -> CKKSEncryptor:
    return CKKSEncryptor(holder.public_context_bytes())


def test_sum_of_10_clients_within_bound(holder: CKKSKeyHolder, encryptor: CKKSEncryptor) -> None:
    rng = np.random.default_rng(0)
    xs = [rng.uniform(-1, 1, 10_000) for _ in range(10)]
    encs = [encryptor.encrypt(x) for x in xs]
    assert len(encs[0].ciphertexts) == num_ciphertexts(10_000, 4096) == 3
    total = encryptor.aggregate(encs)
    assert total.num_clients == 10
    out = holder.decrypt(total)
    assert np.abs(out - sum(xs)).max() < 1e-4


@pytest.mark.parametrize("length", [0, 1, 4095, 4096, 8191])
def test_raw_functions_pack_any_length(length: int) -> None:
    ctx = create_secret_context()
    x = np.linspace(-1, 1, length)
    cts = encrypt_vector(ctx, x)
    assert len(cts) == num_ciphertexts(length, 4096)
    total = add_encrypted(ctx, [cts, cts, cts])
    np.testing.assert_allclose(decrypt_vector(ctx, total, length, 3), 3 * x, atol=1e-6)


def test_alternative_parameters() -> None:
    cfg = CKKSContextConfig(4096, (60, 49), 40)
    kh = CKKSKeyHolder(cfg)
    enc = kh.encryptor()
    x = np.full(3000, 0.5)
    out = kh.decrypt(enc.aggregate([enc.encrypt(x), enc.encrypt(-x), enc.encrypt(x)]))
    np.testing.assert_allclose(out, x, atol=1e-6)
    with pytest.raises(CKKSError):
        create_secret_context(CKKSContextConfig(1024, (60, 60), 40))  # insecure


def test_public_context_cannot_decrypt(holder: CKKSKeyHolder, encryptor: CKKSEncryptor) -> None:
    pub = load_public_context(holder.public_context_bytes())
    assert not pub.is_private() and not encryptor.context.is_private()
    enc = encryptor.encrypt(np.ones(10))
    with pytest.raises(CKKSError, match="no secret key"):
        decrypt_vector(pub, enc.ciphertexts, 10, 1)
    vec = ts.ckks_vector_from(pub, enc.ciphertexts[0])
    with pytest.raises(ValueError):
        vec.decrypt()


def test_wrong_secret_key(holder: CKKSKeyHolder, encryptor: CKKSEncryptor) -> None:
    enc = encryptor.encrypt(np.ones(100))
    other = CKKSKeyHolder()
    with pytest.raises(CKKSError, match="encrypted under key"):
        other.decrypt(enc)
    with pytest.raises(CKKSError, match="wrong secret key or tampered"):
        decrypt_vector(create_secret_context(), enc.ciphertexts, 100, 1)
    with pytest.raises(CKKSError, match="wrong secret key or tampered"):
        decrypt_vector(create_secret_context(), enc.ciphertexts, 100)  # count unknown


def test_tampered_ciphertexts(holder: CKKSKeyHolder, encryptor: CKKSEncryptor) -> None:
    enc = encryptor.encrypt(np.ones(100))
    data = enc.ciphertexts[0]
    for pos in (5, 20, 100, len(data) // 3, len(data) // 2, len(data) - 1000):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        with pytest.raises(CKKSError):
            decrypt_vector(holder._ctx, [bytes(bad)], 100, 1)
        forged = EncryptedVector(100, 1, enc.key_fingerprint, enc.digest, [bytes(bad)])
        with pytest.raises(CKKSError, match="digest"):
            encryptor.aggregate([enc, forged])
    with pytest.raises(CKKSError, match="malformed or tampered"):
        add_encrypted(encryptor.context, [[data], [data[:-10]]])


def test_size_and_count_checks(holder: CKKSKeyHolder, encryptor: CKKSEncryptor) -> None:
    a, b = encryptor.encrypt(np.ones(5000)), encryptor.encrypt(np.ones(4000))
    with pytest.raises(CKKSError, match="expected 5000"):
        encryptor.aggregate([a, b])
    with pytest.raises(CKKSError, match="expected 2"):
        add_encrypted(encryptor.context, [a.ciphertexts, a.ciphertexts[:1]])
    with pytest.raises(CKKSError, match="expected 2"):
        decrypt_vector(holder._ctx, a.ciphertexts[:1], 5000)
    with pytest.raises(CKKSError, match="expected 3"):
        holder.decrypt(encryptor.aggregate([a, a]), num_clients=3)


def test_encrypted_vector_wire_roundtrip(holder: CKKSKeyHolder, encryptor: CKKSEncryptor) -> None:
    x = np.arange(5000) / 5000
    meta, tensors = encryptor.encrypt(x).to_arrays()
    assert set(tensors) == {"ciphertexts", "ciphertexts.lengths"}
    back = EncryptedVector.from_arrays(meta, tensors)
    np.testing.assert_allclose(holder.decrypt(back), x, atol=1e-6)
