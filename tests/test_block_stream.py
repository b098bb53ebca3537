"""The block stream against independent references: the model's own full forward for hidden states,
and naive loops over hand-captured inputs for the per-linear statistics."""

from __future__ import annotations

import threading

import pytest
import torch

from tiny import CAUSAL_FAMILIES
from workbench.engine import block_stream as bs
from workbench.engine.errors import Cancelled
from workbench.engine.variant import copy_block, original_variant, view_model

IDS = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(7))


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_stop_after_block_k_equals_full_forward_hidden_states(tiny_lm, family):
    lm = tiny_lm(family, layers=4)
    with torch.no_grad():
        ref = lm.model(input_ids=IDS, output_hidden_states=True).hidden_states  # ref[k + 1]: after block k
    before = _hook_count(lm.model)  # transformers keeps its own output-recording hooks
    blocks = lm.adapter.blocks(lm.model)
    trace = bs.trace_blocks(lm.model, lm.adapter, IDS)
    v = original_variant(lm.num_blocks)
    for k in range(lm.num_blocks - 1):  # the model's last entry is after the final norm
        torch.testing.assert_close(trace.inputs[k + 1], ref[k + 1], rtol=0, atol=0)
        with torch.no_grad():
            stopped = bs.run_stack(lm.model, IDS, stop_after=blocks[k])
        torch.testing.assert_close(stopped, ref[k + 1], rtol=1e-6, atol=1e-6)
        for i in range(k + 1):  # run from block i, stop after block k
            torch.testing.assert_close(bs.run_span(lm.model, lm.adapter, v, trace, i, stop=k), ref[k + 1],
                                       rtol=1e-5, atol=1e-5)
    assert _hook_count(lm.model) == before


def test_run_stack_stops_after_block_k(tiny_lm):
    lm = tiny_lm("llama", layers=4)
    blocks = lm.adapter.blocks(lm.model)
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    with bs.owned_hooks(*handles), torch.no_grad():
        bs.run_stack(lm.model, IDS, stop_after=blocks[1])
    assert ran == [0, 1]
    assert _hook_count(lm.model) == 0


@pytest.mark.parametrize("chunk", [None, 2])
def test_stream_carries_a_changed_variant_like_its_full_forward(tiny_lm, chunk):
    lm = tiny_lm("llama", layers=5)
    trace = bs.trace_blocks(lm.model, lm.adapter, IDS)
    v = original_variant(lm.num_blocks).with_dropped([1])
    replaced = copy_block(lm.adapter.blocks(lm.model)[3])
    with torch.no_grad():
        for p in replaced.parameters():
            p.mul_(0.5)
    v.overrides[3] = replaced
    with torch.no_grad():
        ref = view_model(lm.model, lm.adapter, v)(input_ids=IDS, output_hidden_states=True).hidden_states
    stream = bs.Stream(lm, trace, batch=chunk)
    for pos, i in enumerate(v.kept()):  # ref[pos]: the input of the variant's pos-th kept block
        torch.testing.assert_close(stream.input_of(v, i), ref[pos], rtol=1e-5, atol=1e-5)
    # after a change from block 3 on, the input of 4 follows the new block 3
    w = v.derive()
    w.overrides[3] = copy_block(lm.adapter.blocks(lm.model)[3])
    stream.changed_from(3)
    # (the model's own recording hooks sit on the blocks of its first forward, not on the new copy:
    # the reference here is the input block 4 receives in the view's full forward)
    got = {}

    def grab(module, args, kwargs):
        got["h"] = args[0] if args else kwargs["hidden_states"]

    block4 = lm.adapter.blocks(lm.model)[4]
    with bs.owned_hooks(block4.register_forward_pre_hook(grab, with_kwargs=True)), torch.no_grad():
        view_model(lm.model, lm.adapter, w)(input_ids=IDS)
    torch.testing.assert_close(stream.input_of(w, 4), got["h"], rtol=1e-5, atol=1e-5)


def test_stream_input_after_dropped_first_blocks_is_the_embedding(tiny_lm):
    lm = tiny_lm("llama", layers=4)
    trace = bs.trace_blocks(lm.model, lm.adapter, IDS)
    v = original_variant(lm.num_blocks).with_dropped([0, 1])
    assert torch.equal(bs.Stream(lm, trace).input_of(v, 2), trace.inputs[0])


def test_stream_checks_cancellation(tiny_lm):
    lm = tiny_lm("llama", layers=4)
    trace = bs.trace_blocks(lm.model, lm.adapter, IDS)
    cancel = threading.Event()
    cancel.set()
    v = original_variant(lm.num_blocks).with_dropped([0])
    with pytest.raises(Cancelled):
        bs.Stream(lm, trace, cancel=cancel).input_of(v, 3)


def test_stream_each_walks_a_sequential_step_and_reports_its_progress(tiny_lm):
    """`each` hands every chosen block its input from the variant as it is at that moment (a block halved
    before is seen by the next), says done / n before each block, and stops when cancelled."""
    lm = tiny_lm("llama", layers=5)
    trace = bs.trace_blocks(lm.model, lm.adapter, IDS)
    said = []
    stream = bs.Stream(lm, trace, progress=lambda f, m: said.append((f, m)))
    new = original_variant(lm.num_blocks).derive()
    seen = {}
    for i, h in stream.each([3, 1, 3], lambda: new, lambda i: f"block {i}"):
        seen[i] = h
        halved = copy_block(lm.adapter.blocks(lm.model)[i])
        with torch.no_grad():
            for p in halved.parameters():
                p.mul_(0.5)
        new.overrides[i] = halved
        stream.changed_from(i)
    assert said == [(0.0, "block 1"), (0.5, "block 3")]
    with torch.no_grad():  # reference: the input of block 3 when block 1 is the halved copy (hidden_states[3])
        ref = view_model(lm.model, lm.adapter, new)(input_ids=IDS, output_hidden_states=True).hidden_states
    torch.testing.assert_close(seen[1], trace.inputs[1], rtol=0, atol=0)
    torch.testing.assert_close(seen[3], ref[3], rtol=1e-5, atol=1e-5)
    cancel = threading.Event()
    walk = bs.Stream(lm, trace, cancel=cancel).each([0, 2], lambda: new, str)
    next(walk)
    cancel.set()
    with pytest.raises(Cancelled):
        next(walk)


def _naive_inputs(block, linears, hidden, call):
    """Every linear's input captured by plain hooks in one whole-batch run: (tokens, in) float32."""
    got = {}

    def make(name):
        def pre(module, args):
            got[name] = args[0].reshape(-1, args[0].shape[-1]).float()

        return pre

    handles = [m.register_forward_pre_hook(make(n)) for n, m in linears.items()]
    with bs.owned_hooks(*handles), torch.no_grad():
        bs.run_block(block, hidden, call)
    return got


def test_hessian_and_squared_norm_statistics_equal_a_naive_loop(tiny_lm):
    lm = tiny_lm("llama", layers=3)
    trace = bs.trace_blocks(lm.model, lm.adapter, IDS)
    block = lm.adapter.blocks(lm.model)[1]
    linears = lm.adapter.linears(block)
    x = _naive_inputs(block, linears, trace.inputs[1], trace.calls[1])
    stream = bs.Stream(lm, trace, batch=2)  # chunked: the sums must not depend on the chunking
    with torch.no_grad():
        hs = stream.collect(bs.HessianStats(linears), block, 1, trace.inputs[1])
        sn = stream.collect(bs.SquaredNorms(linears), block, 1, trace.inputs[1])
    for name, xi in x.items():
        ref_h = torch.zeros(xi.shape[1], xi.shape[1], dtype=torch.float64)
        ref_n = torch.zeros(xi.shape[1], dtype=torch.float64)
        for row in xi.double():  # one token at a time
            ref_h += torch.outer(row, row)
            ref_n += row * row
        torch.testing.assert_close(hs.hessian(name).double(), ref_h / xi.shape[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sn.sq[name].double(), ref_n, rtol=1e-4, atol=1e-5)
        assert hs.counts[hs.owner[name]] == IDS.numel()
    groups = sorted(sorted(g) for g in hs.shared_groups())
    assert sorted(["k", "q", "v"]) in groups and sorted(["gate", "up"]) in groups  # one input, one Hessian
    assert _hook_count(lm.model) == 0


def test_statistic_hooks_are_removed_when_the_forward_fails(tiny_lm):
    lm = tiny_lm("llama", layers=2)
    block = lm.adapter.blocks(lm.model)[0]
    stat = bs.SquaredNorms(lm.adapter.linears(block))
    with pytest.raises(RuntimeError):
        with stat.watching():
            raise RuntimeError("boom")
    assert _hook_count(lm.model) == 0


def test_point_hooks_read_a_module_input_and_output(tiny_lm):
    """Llama by hand: h = x + o(attn); the MLP reads post_attention_layernorm(h); out = h + mlp(that)."""
    lm = tiny_lm("llama", layers=2)
    trace = bs.trace_blocks(lm.model, lm.adapter, IDS)
    block = lm.adapter.blocks(lm.model)[0]
    lin = lm.adapter.linears(block)
    seen = {}
    points = {"o_out": (lin["o"], "out"), "up_in": (lin["up"], "in"), "block_out": (block, "out")}
    x = trace.inputs[0]
    with bs.owned_hooks(*bs.point_hooks(points, seen.__setitem__)), torch.no_grad():
        out = bs.run_block(block, x, trace.calls[0])
    assert _hook_count(lm.model) == 0
    with torch.no_grad():
        mlp_in = block.post_attention_layernorm(x + seen["o_out"])
        torch.testing.assert_close(seen["up_in"], mlp_in, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, x + seen["o_out"] + block.mlp(mlp_in), rtol=1e-5, atol=1e-6)
    assert torch.equal(seen["block_out"], out)


def test_a_trace_up_to_block_k_records_the_full_traces_inputs_up_to_k(tiny_lm):
    """trace_blocks(upto=k) (GPTQ of the first blocks): the same inputs and call arguments as the full
    trace for blocks 0..k, nothing after k, and block k's output (checked against running block k)."""
    lm = tiny_lm("llama", layers=5)
    ids = torch.randint(0, lm.model.config.vocab_size, (2, 9))
    full = bs.trace_blocks(lm.model, lm.adapter, ids)
    part = bs.trace_blocks(lm.model, lm.adapter, ids, upto=2)
    for i in range(3):
        assert torch.equal(part.inputs[i], full.inputs[i])
        assert part.calls[i].kwargs.keys() == full.calls[i].kwargs.keys()
    assert part.inputs[3:] == [None, None] and part.calls[3:] == [None, None]
    block2 = lm.adapter.blocks(lm.model)[2]
    with torch.no_grad():
        assert torch.equal(part.output, bs.run_block(block2, full.inputs[2], full.calls[2]))
        assert torch.equal(full.inputs[3], part.output)
