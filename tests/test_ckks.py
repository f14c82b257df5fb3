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
    NoiseFlooding,
    add_encrypted,
    create_secret_context,
    decrypt_vector,
    encrypt_vector,
    load_public_context,
    num_ciphertexts,
    secure_normal,
)


@pytest.fixture(scope="module")
def holder() -> CKKSKeyHolder:
    return CKKSKeyHolder()


@pytest.fixture(scope="module")
def encryptor(holder: CKKSKeyHolder) -> CKKSEncryptor:
    return CKKSEncryptor(holder.public_context_bytes())


def test_sum_of_10_clients_is_released_flooded(holder: CKKSKeyHolder, encryptor: CKKSEncryptor) -> None:
    rng = np.random.default_rng(0)
    xs = [rng.uniform(-1, 1, 10_000) for _ in range(10)]
    encs = [encryptor.encrypt(x) for x in xs]
    assert len(encs[0].ciphertexts) == num_ciphertexts(10_000, 4096) == 3
    total = encryptor.aggregate(encs)
    assert total.num_clients == 10
    release = holder.release(total)
    err = release.vector(10_000) - sum(xs)
    sigma = NoiseFlooding().value_sigma(8192, NoiseFlooding().error_bound(8192, 10), 1024, 2.0**56)
    assert release.sigmas.min() >= sigma and release.sigmas.max() < 1.5 * sigma < 1e-4
    assert 0.8 * sigma < err.std() < 1.5 * sigma  # the flooding noise is there, at the stated size
    assert np.abs(err).max() < 7 * release.sigmas.max() and abs(err.mean()) < 5 * sigma / 100
    grid = NoiseFlooding().grid(release.sigmas[0])
    np.testing.assert_array_equal(release.values[0] / grid, np.round(release.values[0] / grid))  # rounded


@pytest.mark.parametrize("length", [0, 1, 4095, 4096, 8191])
def test_raw_functions_pack_any_length(length: int) -> None:
    ctx = create_secret_context()
    x = np.linspace(-1, 1, length)
    cts = encrypt_vector(ctx, x)
    assert len(cts) == num_ciphertexts(length, 4096)
    total = add_encrypted(ctx, [cts, cts, cts])
    np.testing.assert_allclose(decrypt_vector(ctx, total, length, 3), 3 * x, atol=1e-6)


def test_alternative_parameters_and_what_flooding_costs_at_a_small_scale() -> None:
    cfg = CKKSContextConfig(4096, (60, 49), 40)
    kh = CKKSKeyHolder(cfg, query_budget=8)
    enc = kh.encryptor()
    x = np.full(3000, 0.5)
    total = enc.aggregate([enc.encrypt(x), enc.encrypt(-x), enc.encrypt(x)])
    np.testing.assert_allclose(decrypt_vector(kh._ctx, total.ciphertexts, 3000, 3), x, atol=1e-6)  # raw
    release = kh.release(total)
    assert release.sigmas.min() > 1e-3  # at scale 2^40 the flooding swamps 1e-4: hence the default 2^56
    assert np.abs(release.vector(3000) - x).max() < 7 * release.sigmas.max()
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
    np.testing.assert_allclose(decrypt_vector(holder._ctx, back.ciphertexts, 5000, 1), x, atol=1e-9)


def test_fresh_error_model_matches_seal() -> None:
    """The honest-sum bound B rests on SEAL's fresh encryption error: sqrt((2N/3 + 2) / 12) per
    coefficient, i.e. that times sqrt(N/2) / scale per slot, real and imaginary parts alike."""
    from fedguard.secure.ckks import _SlotDecryptor

    holder = CKKSKeyHolder()
    enc = holder.encryptor()
    slots = _SlotDecryptor(holder._ctx)
    rng = np.random.default_rng(3)
    for n in (1, 10):
        xs = [rng.uniform(-1, 1, 4095) for _ in range(n)]
        total = enc.aggregate([enc.encrypt(x) for x in xs])
        z, scale = slots.slots(total.ciphertexts[0], "sum")
        model = NoiseFlooding.fresh_sigma(8192) * np.sqrt(n) * np.sqrt(4096) / scale
        assert 0.85 < (z.real[:-1] - sum(xs)).std() / model < 1.15
        assert 0.85 < z.imag.std() / model < 1.15
    assert holder.release(total).noise_bits == pytest.approx(np.log2(NoiseFlooding().error_bound(8192, 10)))


def test_inflated_error_raises_the_flooding() -> None:
    """Adversary: clients that inflate the decryption error (here 64 encryptions passed off as a
    sum of 4) so that flooding sized for an honest sum would be too small. The imaginary parts
    show the larger error and the key holder floods for it."""
    holder = CKKSKeyHolder(query_budget=4)
    pub = holder.encryptor()
    block = np.zeros(4096)
    block[-1] = 1 / 16
    cts = [ts.ckks_vector(pub.context, block.tolist()).serialize() for _ in range(64)]
    total = add_encrypted(pub.context, [[c] for c in cts])
    enc = EncryptedVector(4095, 4, pub.fingerprint, EncryptedVector.compute_digest(total), total)
    honest = np.log2(NoiseFlooding().error_bound(8192, 4))
    release = holder.release(enc)
    assert release.noise_bits == pytest.approx(honest + 2, abs=0.2)  # 4x the honest deviation: 2 more bits
    assert np.abs(release.vector(4095)).max() < 7 * release.sigmas.max()


def test_query_budget_is_enforced() -> None:
    holder = CKKSKeyHolder(query_budget=3)
    enc = holder.encryptor()
    total = enc.aggregate([enc.encrypt(np.ones(5000)), enc.encrypt(np.ones(5000))])
    holder.release(total)
    assert holder.decrypted == 2
    with pytest.raises(CKKSError, match="budget of 3"):
        holder.release(total)


def test_flooding_noise_comes_from_the_os_csprng() -> None:
    """Seeding numpy and torch does not make the noise reproducible; its distribution is N(0, s^2)."""
    import torch

    draws = []
    for _ in range(2):
        np.random.seed(0)
        torch.manual_seed(0)
        draws.append(secure_normal(200_001, 2.0))
    assert not np.array_equal(draws[0], draws[1])
    assert abs(draws[0].mean()) < 0.03 and abs(draws[0].std() - 2.0) < 0.02
    assert abs(np.mean(np.abs(draws[0]) > 4.0) - 0.0455) < 0.003  # two-sided 2-sigma tail


def test_a_block_at_another_scale_is_refused_before_adding() -> None:
    holder = CKKSKeyHolder()
    enc = holder.encryptor()
    good = enc.encrypt(np.ones(10))
    other = CKKSEncryptor(holder.public_context_bytes())
    other.context.global_scale = 2.0**50
    bad = other.encrypt(np.ones(10))
    with pytest.raises(CKKSError, match="scale"):
        enc.aggregate([good, bad])
