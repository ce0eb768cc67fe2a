"""torch.cuda's stream and CUDA-graph API faked on the CPU, shared by tests/test_graph.py and the
torchrun workers of tests/dist_helper.py (--fake-graph)."""
import contextlib

import torch

import fasttrain.graph as graph_module


class FakeCudaGraphs:
    """torch.cuda's stream and graph API on the CPU: a capture runs the step once (as a real capture
    does not: GraphedStep restores the state after it either way), and a replay runs the captured
    step again into the static outputs. What this checks is fasttrain's plumbing (static inputs,
    persistent gradients, state restore, the trainer's warmup -> capture -> replay,
    checkpoints and resume; under DDP, that every rank captures and replays in lockstep), not CUDA's
    semantics: the gpu tests in tests/test_graph.py do that.

    `patch(owner, name, value)` installs each fake: pytest's monkeypatch.setattr in a test (undone
    after it), plain `setattr` in a process that ends with its run (tests/dist_helper.py)."""

    def __init__(self, patch):
        self.captures = self.replays = 0
        self.warmups: list[int] = []  # per capture: the eager steps run before it (GraphedStep's warmup)
        self.capture_modes: list[str] = []  # per capture: its capture_error_mode
        self._eager = 0  # eager step bodies since the last capture
        fake = self
        original_init = graph_module.GraphedStep.__init__
        original_body = graph_module.GraphedStep._zeroed_body

        def init(step, *args, **kwargs):
            fake.step = step
            original_init(step, *args, **kwargs)

        def eager_body(step):
            fake._eager += 1
            return original_body(step)

        class Graph:
            def replay(self):
                fake.replays += 1
                loss, logits = original_body(fake.step)
                fake.step.loss.copy_(loss)
                fake.step.logits.copy_(logits)

        @contextlib.contextmanager
        def capture(graph, capture_error_mode="global"):
            assert capture_error_mode in ("global", "thread_local")
            fake.captures += 1
            fake.warmups.append(fake._eager)
            fake.capture_modes.append(capture_error_mode)
            yield
            fake._eager = 0  # the capture's own body is not a warmup step

        class Stream:
            def __init__(self, *args, **kwargs):
                pass

            def wait_stream(self, other):
                pass

        patch(graph_module, "_require_cuda", lambda t: None)
        patch(graph_module.GraphedStep, "__init__", init)
        patch(graph_module.GraphedStep, "_zeroed_body", eager_body)
        for name, value in {"CUDAGraph": Graph, "graph": capture, "Stream": Stream,
                            "current_stream": lambda device=None: Stream(),
                            "stream": lambda s: contextlib.nullcontext(),
                            "get_rng_state": lambda device=None: torch.get_rng_state(),
                            "set_rng_state": lambda state, device=None: torch.set_rng_state(state)}.items():
            patch(torch.cuda, name, value)
