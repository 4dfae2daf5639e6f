"""bench.engine's first-difference check: which step, which context, which gap."""
import torch

from bench.engine import TIE_NATS, RunTiming, make_row, tie_gaps
from tests.tiny_models import load_hf_model, make_tiny_checkpoint, single_thread


def test_tie_gaps_reads_the_first_difference_in_its_own_context(tmp_path):
    with single_thread():
        hf = load_hf_model(make_tiny_checkpoint(tmp_path / "m", seed=3))
        prompts = [[5, 9, 17, 33], [7, 8, 9, 10]]
        with torch.inference_mode():
            out = hf.generate(torch.tensor(prompts), max_new_tokens=5, do_sample=False,
                              pad_token_id=0)[:, 4:].tolist()
        assert tie_gaps(hf, prompts, out, out, torch.device("cpu")) == []
        # The second sequence takes transformers' least likely token at step 2 and goes on
        # with other tokens after it (which must not matter: only the first difference counts).
        context = prompts[1] + out[1][:2]
        with torch.inference_mode():
            logprobs = torch.log_softmax(hf(torch.tensor([context])).logits[0, -1].float(), -1)
        worst = int(logprobs.argmin())
        ours = [out[0], out[1][:2] + [worst, 1, 2]]
        gaps = tie_gaps(hf, prompts, ours, out, torch.device("cpu"))
    assert len(gaps) == 1
    assert abs(gaps[0] - float(logprobs[out[1][2]] - logprobs[worst])) < 1e-3
    assert gaps[0] > TIE_NATS["bfloat16"]  # a random model's best vs worst token: no tie
    timing = RunTiming(0.1, 1.0, ours)
    row = make_row("tiny", "float32", 2, 5, 1000, timing, RunTiming(0.1, 1.0, out),
                   {"read_gbps": 1.0, "matmul_gflops": 1.0}, gaps)
    assert row["greedy_match"] == 0.5 and row["near_ties"] is False
