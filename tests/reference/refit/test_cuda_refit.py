"""The refit of docs/refit.md on a GPU: CUDA models, VRAM arenas, real NIXL (UCX cuda transports).

The CPU suite runs the same reference code over the CPU mock backend; these run it on the
hardware it is written for. The second test is why refits apply in place: a CUDA graph captured
before the refit replays the new weights, because no parameter moved.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mx_reference.transport.nixl import nixl_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not nixl_available(), reason="no nixl wheel"),
]


def _refit_rig():
    from transformers import LlamaConfig, LlamaForCausalLM

    from mx_reference.backends import CudaBackend
    from mx_reference.refit import (
        PublisherConfig,
        ReceiverConfig,
        RefitModelConfig,
        RefitPublisher,
        RefitReceiver,
        TargetLayout,
        VersionRegistry,
        megatron_shards_from_hf,
    )
    from mx_reference.transport.nixl import NixlTransport

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    trainer = LlamaForCausalLM(config).cuda().eval()
    engine = LlamaForCausalLM(config).cuda().eval()
    cfg, backend = RefitModelConfig.from_hf(config), CudaBackend()
    registry = VersionRegistry(dist.HashStore())
    publisher = RefitPublisher(
        NixlTransport("trainer", backend), registry, PublisherConfig("llama"), backend=backend
    )
    receiver = RefitReceiver(
        engine,
        transport=NixlTransport("engine", backend),
        registry=registry,
        config=ReceiverConfig("llama"),
        target=TargetLayout(),
        model_config=cfg,
        backend=backend,
    )

    def publish(version: int) -> None:
        shards = megatron_shards_from_hf(trainer.state_dict(), cfg, tp_size=1, tp_rank=0)
        publisher.publish(version, shards)

    return trainer, engine, publish, receiver


def test_refit_between_cuda_models_over_nixl_vram():
    trainer, engine, publish, receiver = _refit_rig()
    before = {n: p.detach().clone() for n, p in engine.named_parameters()}
    addresses = {n: p.data_ptr() for n, p in engine.named_parameters()}
    want = trainer.state_dict()
    assert any(not torch.equal(before[n], want[n]) for n in before)  # A != B
    publish(1)
    timing = receiver.refit()
    torch.cuda.synchronize()
    assert timing.version == 1 and timing.bytes_pulled > 0
    for n, p in engine.named_parameters():
        assert p.is_cuda and p.data_ptr() == addresses[n], n
        assert torch.equal(p, want[n]), n


def test_a_cuda_graph_captured_before_a_refit_replays_the_new_weights():
    trainer, engine, publish, receiver = _refit_rig()
    ids = torch.randint(0, 128, (1, 8), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture, as torch's docs require
            engine(ids, use_cache=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        captured = engine(ids, use_cache=False).logits
    graph.replay()
    old = captured.clone()
    with torch.no_grad():
        want = trainer(ids, use_cache=False).logits
    assert not torch.allclose(old, want, atol=1e-3)
    publish(1)
    receiver.refit()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, want, rtol=0, atol=1e-5)
