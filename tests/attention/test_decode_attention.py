"""Decode attention (one query token per conversation, many conversations per call): the
native kernel and the torch path against an fp64 reference, and the property batching
rests on: a conversation's output is the same bits in a batch as alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from loopserve.attention import decode as decode_module
from loopserve.attention.decode import decode_attention, torch_decode_attention
from loopserve.native import native_kernels
from loopserve.threads import intra_op_threads

HAVE_NATIVE = native_kernels() is not None
native_only = pytest.mark.skipif(not HAVE_NATIVE, reason="no native kernels (no C compiler)")


def segment(H, Hkv, N, D, seed, cap=None):
    """A query and a store sliced to N tokens out of `cap`, as a session cache layer holds it."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, 1, D, generator=g)
    cap = cap or N + 7
    k = torch.randn(1, Hkv, cap, D, generator=g)[:, :, :N]
    v = torch.randn(1, Hkv, cap, D, generator=g)[:, :, :N]
    return q, k, v


def reference(q, k, v, scale):
    H, Hkv = q.shape[1], k.shape[1]
    out = torch.empty(1, H, 1, q.shape[-1], dtype=torch.float64)
    for h in range(H):
        kh, vh = k[0, h // (H // Hkv)].double(), v[0, h // (H // Hkv)].double()
        out[0, h] = torch.softmax(q[0, h].double() @ kh.T * scale, -1) @ vh
    return out


# (H, H_kv, D): SmolLM2's shape (the specialised path), the tiny test models' (generic
# path), a head size the kernel has no vector path for, and one query head per KV head.
SHAPES = [(9, 3, 64), (4, 2, 16), (6, 2, 24), (2, 2, 128)]
LENGTHS = [1, 15, 16, 255, 256, 257, 1000]


@pytest.mark.parametrize("H,Hkv,D", SHAPES)
def test_batch_matches_fp64_reference(H, Hkv, D):
    segs = [segment(H, Hkv, N, D, seed=i) for i, N in enumerate(LENGTHS)]
    outs = decode_attention(*map(list, zip(*segs)), D**-0.5)
    for (q, k, v), out in zip(segs, outs):
        assert out.shape == (1, H, 1, D) and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), reference(q, k, v, D**-0.5), rtol=0.0, atol=2e-6)


@pytest.mark.parametrize("H,Hkv,D", SHAPES)
def test_output_in_a_batch_is_the_same_bits_as_alone(H, Hkv, D):
    segs = [segment(H, Hkv, N, D, seed=10 + i) for i, N in enumerate(LENGTHS)]
    batched = decode_attention(*map(list, zip(*segs)), 0.3)
    for (q, k, v), out in zip(segs, batched):
        assert torch.equal(decode_attention([q], [k], [v], 0.3)[0], out)
    # Order and company do not matter either.
    reordered = decode_attention(*map(list, zip(*segs[::-1])), 0.3)[::-1]
    assert all(torch.equal(a, b) for a, b in zip(batched, reordered))


@native_only
def test_native_path_is_taken_and_thread_count_does_not_change_the_bits(monkeypatch):
    calls = []
    kernels = native_kernels()
    spy = dataclasses.replace(kernels, decode_attention=lambda *a: calls.append(a[-1]) or kernels.decode_attention(*a))
    monkeypatch.setattr(decode_module, "native_kernels", lambda: spy)
    segs = [segment(9, 3, N, 64, seed=N) for N in (300, 2000)]
    outs = {}
    for threads in (1, 2, 3):
        with intra_op_threads(threads):  # the kernel takes torch's thread count
            outs[threads] = decode_attention(*map(list, zip(*segs)), 0.125)
    assert calls == [1, 2, 3]  # one kernel call per batch, on torch's thread count
    assert all(torch.equal(a, b) for t in (2, 3) for a, b in zip(outs[1], outs[t]))


def test_torch_path_matches_reference_and_is_used_for_other_dtypes():
    q, k, v = segment(6, 2, 50, 32, seed=3)
    torch.testing.assert_close(torch_decode_attention(q, k, v, 0.2).double(), reference(q, k, v, 0.2), rtol=0.0, atol=2e-6)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    (out,) = decode_attention([qb], [kb], [vb], 0.2)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch_decode_attention(qb, kb, vb, 0.2))


def test_layouts_the_kernel_cannot_read_fall_back_to_the_torch_path():
    q, k, v = segment(4, 2, 40, 16, seed=4)
    k_t = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # D not the innermost stride
    (out,) = decode_attention([q], [k_t], [v], 0.25)
    torch.testing.assert_close(out.double(), reference(q, k, v, 0.25), rtol=0.0, atol=2e-6)


def test_empty_batch():
    assert decode_attention([], [], [], 0.5) == []


def test_a_segment_the_kernel_cannot_take_leaves_the_others_on_their_own_path():
    segs = [segment(9, 3, N, 64, seed=20 + N) for N in (40, 300)]
    q, k, v = segment(9, 3, 100, 64, seed=5)
    odd = (q.bfloat16(), k.bfloat16(), v.bfloat16())
    batch = [segs[0], odd, segs[1]]
    outs = decode_attention(*map(list, zip(*batch)), 0.125)
    assert outs[1].dtype == torch.bfloat16 and torch.equal(outs[1], torch_decode_attention(*odd, 0.125))
    for (qs, ks, vs), out in zip(segs, (outs[0], outs[2])):
        assert torch.equal(out, decode_attention([qs], [ks], [vs], 0.125)[0])


def view_of(k, seed, L, tail):
    """Sorted store indices (H_kv, L) below `tail`, as a selection leaves them."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(tail, generator=g)[:L].sort().values for _ in range(k.shape[1])])


@pytest.mark.parametrize("H,Hkv,D", SHAPES)
def test_a_view_read_by_index_is_the_same_bits_as_its_rows_copied_out(H, Hkv, D):
    segs = [segment(H, Hkv, N, D, seed=30 + N) for N in (300, 700)]
    views = [(view_of(segs[0][1], 1, 200, 280), 280), (view_of(segs[1][1], 2, 300, 650), 650)]
    by_index = decode_attention(*map(list, zip(*segs)), 0.2, views)
    for (q, k, v), view, out in zip(segs, views, by_index):
        rows = torch.cat([view[0], torch.arange(view[1], k.shape[2]).expand(Hkv, -1)], dim=1)
        k_copy = torch.stack([k[0, h, rows[h]] for h in range(Hkv)])[None]
        v_copy = torch.stack([v[0, h, rows[h]] for h in range(Hkv)])[None]
        assert torch.equal(out, decode_attention([q], [k_copy], [v_copy], 0.2)[0])
        torch.testing.assert_close(out.double(), reference(q, k_copy, v_copy, 0.2), rtol=0.0, atol=2e-6)
    # The torch path (here for bf16) reads the same rows.
    q, k, v = (t.bfloat16() for t in segs[0])
    (out,) = decode_attention([q], [k], [v], 0.2, [views[0]])
    rows = torch.cat([views[0][0], torch.arange(280, 300).expand(Hkv, -1)], dim=1)
    k_copy = torch.stack([k[0, h, rows[h]] for h in range(Hkv)])[None]
    v_copy = torch.stack([v[0, h, rows[h]] for h in range(Hkv)])[None]
    assert torch.equal(out, torch_decode_attention(q, k_copy, v_copy, 0.2))


@native_only
@pytest.mark.parametrize("H,Hkv,D", SHAPES)
def test_strided_queries_of_a_packed_step_give_the_same_bits_as_packed_copies(H, Hkv, D):
    segs = [segment(H, Hkv, N, D, seed=N) for N in (40, 300, 700)]
    packed = torch.cat([q for q, _, _ in segs], dim=2)  # (1, H, S, D): one row per segment, as a packed step's query
    strided = list(packed.split(1, dim=2))
    assert not strided[1].is_contiguous()
    _, keys, values = map(list, zip(*segs))
    views = [None, (view_of(keys[1], 5, 150, 290), 290), (view_of(keys[2], 6, 400, 690), 690)]
    for v in (None, views):
        got = decode_attention(strided, keys, values, 0.125, v)
        want = decode_attention([q.contiguous() for q in strided], keys, values, 0.125, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
