"""CKKS libraries measured the same way: TenSEAL (SEAL) and OpenFHE, for the encrypted-sum workload.

Standalone (OpenFHE's wheel is built for CPython 3.10 only, fedguard's interpreter is 3.11), so
it runs under whichever interpreter has the library and measures what imports there::

    python benchmarks/ckks_libraries.py                      # TenSEAL, in fedguard's environment
    /tmp/he310/bin/python benchmarks/ckks_libraries.py      # OpenFHE, in a Python 3.10 venv

Workload: ``clients`` vectors of ``values`` floats uniform in [-1, 1] (1,663,370 = CNN-M), N = 8192
(4,096 slots), scale 2^40, first prime 60 bits, no multiplicative depth; each client encrypts its
vector, the server adds them, one secret key decrypts the sum. With OpenFHE also threshold CKKS:
``parties`` key holders make a joint key (MultipartyKeyGen); the sum is decrypted by fusing one
partial decryption per party, and one party's secret key alone decrypts to noise.
Prints one JSON object per library.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

SLOTS, SCALE_BITS, FIRST_BITS = 4096, 40, 60


class Clock:
    """Wall and CPU (all threads of this process) seconds since start: CPU time is the steadier
    figure on a shared machine."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self, per: int = 1) -> dict[str, float]:
        return {"wall_s": round((time.perf_counter() - self.wall) / per, 3),
                "cpu_s": round((time.process_time() - self.cpu) / per, 3)}


def _chunks(vec: np.ndarray) -> list[list[float]]:
    return [vec[i : i + SLOTS].tolist() for i in range(0, vec.size, SLOTS)]


def bench_tenseal(inputs: list[np.ndarray]) -> dict[str, object]:
    """TenSEAL CKKSVector: encrypt per client, add, decrypt."""
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=2 * SLOTS, coeff_mod_bit_sizes=[FIRST_BITS, 60])
    ctx.global_scale = 2.0**SCALE_BITS
    clock = Clock()
    cts = [[ts.ckks_vector(ctx, c) for c in _chunks(v)] for v in inputs]
    enc_s = clock.read(len(inputs))
    size = sum(len(c.serialize()) for c in cts[0])
    clock = Clock()
    acc = cts[0]
    for client in cts[1:]:
        for a, b in zip(acc, client, strict=True):
            a.add_(b)
    sum_s = clock.read()
    clock = Clock()
    out = np.concatenate([np.array(a.decrypt()) for a in acc])[: inputs[0].size]
    dec_s = clock.read()
    return _figures("tenseal " + ts.__version__, inputs, out, enc_s, sum_s, dec_s, size)


def _openfhe_context(o, scale_bits: int = SCALE_BITS):  # noqa: ANN001, ANN202 - the module has no stubs
    p = o.CCParamsCKKSRNS()
    p.SetMultiplicativeDepth(0)
    p.SetScalingModSize(scale_bits)
    p.SetFirstModSize(FIRST_BITS)
    p.SetRingDim(2 * SLOTS)
    p.SetBatchSize(SLOTS)
    p.SetScalingTechnique(o.FIXEDMANUAL)
    p.SetSecurityLevel(o.HEStd_128_classic)
    cc = o.GenCryptoContext(p)
    for feature in (o.PKE, o.KEYSWITCH, o.LEVELEDSHE, o.MULTIPARTY):
        cc.Enable(feature)
    return cc


def _openfhe_decrypt(o, cc, cts, key, length: int) -> np.ndarray:  # noqa: ANN001
    parts = []
    for ct in cts:
        pt = cc.Decrypt(ct, key)
        pt.SetLength(SLOTS)
        parts.append(np.array(pt.GetRealPackedValue()))
    return np.concatenate(parts)[:length]


def bench_openfhe(inputs: list[np.ndarray], parties: int, threshold_scale_bits: int) -> dict[str, object]:
    """OpenFHE CKKS-RNS: single key, then threshold (``parties``-of-``parties``) decryption."""
    import openfhe as o

    cc = _openfhe_context(o)
    kp = cc.KeyGen()
    clock = Clock()
    cts = [[cc.Encrypt(kp.publicKey, cc.MakeCKKSPackedPlaintext(c)) for c in _chunks(v)] for v in inputs]
    enc_s = clock.read(len(inputs))
    size = sum(len(o.Serialize(c, o.BINARY)) for c in cts[0])
    clock = Clock()
    acc = cts[0]
    for client in cts[1:]:
        acc = [cc.EvalAdd(a, b) for a, b in zip(acc, client, strict=True)]
    sum_s = clock.read()
    clock = Clock()
    out = _openfhe_decrypt(o, cc, acc, kp.secretKey, inputs[0].size)
    dec_s = clock.read()
    figures = _figures(f"openfhe {o.__version__ if hasattr(o, '__version__') else ''}".strip(), inputs, out,
                       enc_s, sum_s, dec_s, size)
    # threshold decryption adds flooding noise: report it at the default scale and a finer one
    figures["threshold"] = [
        {"scale_bits": bits, **_openfhe_threshold(o, _openfhe_context(o, bits), inputs, parties)}
        for bits in sorted({SCALE_BITS, threshold_scale_bits})
    ]
    return figures


def _openfhe_threshold(o, cc, inputs: list[np.ndarray], parties: int) -> dict[str, object]:  # noqa: ANN001
    """Joint key of ``parties`` holders; fused partial decryptions recover the sum, one key alone does not."""
    clock = Clock()
    keys = [cc.KeyGen()]
    for _ in range(parties - 1):
        keys.append(cc.MultipartyKeyGen(keys[-1].publicKey))
    keygen_s = clock.read()
    joint = keys[-1].publicKey
    cts = [[cc.Encrypt(joint, cc.MakeCKKSPackedPlaintext(c)) for c in _chunks(v)] for v in inputs]
    acc = cts[0]
    for client in cts[1:]:
        acc = [cc.EvalAdd(a, b) for a, b in zip(acc, client, strict=True)]
    clock = Clock()
    out = []
    for ct in acc:
        shares = cc.MultipartyDecryptLead([ct], keys[0].secretKey)
        for kp in keys[1:]:
            shares += cc.MultipartyDecryptMain([ct], kp.secretKey)
        pt = cc.MultipartyDecryptFusion(shares)
        pt.SetLength(SLOTS)
        out.append(np.array(pt.GetRealPackedValue()))
    fused_s = clock.read()
    total = sum(inputs)
    got = np.concatenate(out)[: total.size]
    try:  # one key holder on its own: noise (OpenFHE usually refuses to decode it at all)
        alone = _openfhe_decrypt(o, cc, acc[:1], keys[0].secretKey, min(SLOTS, total.size))
        one_alone: object = float(np.abs(alone - total[: alone.size]).max())
    except RuntimeError as exc:
        one_alone = f"decryption refused: {str(exc).split(':')[-1].strip()}"
    return {
        "parties": parties,
        "keygen": keygen_s,
        "fused_decrypt": fused_s,
        "max_abs_err": float(np.abs(got - total).max()),
        "one_party_alone": one_alone,
    }


def _figures(lib, inputs, out, enc_s, sum_s, dec_s, size) -> dict[str, object]:  # noqa: ANN001
    total = sum(inputs)
    return {
        "library": lib,
        "clients": len(inputs),
        "values": int(inputs[0].size),
        "encrypt_per_client": enc_s,
        "sum": sum_s,
        "decrypt": dec_s,
        "bytes_per_client": int(size),
        "max_abs_err": float(np.abs(out - total).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--values", type=int, default=1_663_370)
    parser.add_argument("--parties", type=int, default=3, help="OpenFHE threshold key holders")
    parser.add_argument("--threshold-scale-bits", type=int, default=50, help="second scale tried for threshold CKKS")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    inputs = [rng.uniform(-1, 1, args.values) for _ in range(args.clients)]
    runs = (
        ("tenseal", lambda: bench_tenseal(inputs)),
        ("openfhe", lambda: bench_openfhe(inputs, args.parties, args.threshold_scale_bits)),
    )
    for name, fn in runs:
        try:
            print(json.dumps(fn()), flush=True)
        except ImportError as exc:
            print(json.dumps({"library": name, "skipped": f"does not import here: {exc}"}), flush=True)


if __name__ == "__main__":
    main()
