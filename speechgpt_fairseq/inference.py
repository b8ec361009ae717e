"""Generation from Python: load a checkpoint of ours (any stage, LoRA included) and continue prompts.

    from speechgpt_fairseq.inference import SpeechGPTModel
    model = SpeechGPTModel.from_checkpoint("checkpoints/stage3/checkpoint_best.pt")
    model.generate(["[Human]: What is two plus two?<eoh>. [SpeechGPT]:"], max_new_tokens=64)

It runs the same code as fairseq-generate (the task's generator: prompt prefill, stop at `<eoa>`), so the two
give the same outputs. SpeechGPT sampled with temperature 0.7, top-k 50, top-p 0.8 in its demo (`SPEECHGPT_SAMPLING`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from fairseq import checkpoint_utils
from fairseq.data import data_utils
from fairseq.dataclass.configs import GenerationConfig
from fairseq.dataclass.utils import merge_with_parent
from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY
from omegaconf import OmegaConf

from speechgpt_fairseq.data.vocabulary import Vocabulary


@dataclass
class Sampling:
    """Decoding settings: greedy by default; `sample=True` samples with temperature, top-k and top-p."""

    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    beam: int = 1


SPEECHGPT_SAMPLING = Sampling(sample=True, temperature=0.7, top_k=50, top_p=0.8)


class SpeechGPTModel:
    """A loaded checkpoint with its vocabulary and task, ready to generate."""

    def __init__(self, model, task):
        self.model, self.task, self.vocab = model.eval(), task, task.vocab
        self.dictionary = task.target_dictionary

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "SpeechGPTModel":
        """Load a fairseq checkpoint written by training, `speechgpt convert-hf` or `import-peft`."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such checkpoint")
        state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
        cfg = state["cfg"]
        vocab_dict = (state.get("task_state") or {}).get("vocabulary")
        if vocab_dict is None:
            raise ValueError(f"{path}: carries no vocabulary (task state); was it written by speechgpt-fairseq?")
        name = cfg.task._name
        task_cfg = merge_with_parent(TASK_DATACLASS_REGISTRY[name](), cfg.task)
        task = TASK_REGISTRY[name](task_cfg, Vocabulary.from_dict(vocab_dict, source=path))
        model = task.build_model(cfg.model)
        model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
        if dtype is not None:
            model = model.to(dtype)
        return cls(model.to(device), task)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int = 512, sampling: Sampling = Sampling(),
                 seed: int | None = None) -> list[str]:
        """Continue each prompt text (e.g. ending with `[SpeechGPT]:`); return the generated texts without the
        prompt, ending with the task's stop text (`<eoa>`) when generation stopped there."""
        if seed is not None:
            torch.manual_seed(seed)
        d = self.dictionary
        ids = [torch.tensor(self.vocab.encode(p), dtype=torch.long) for p in prompts]
        prompt = data_utils.collate_tokens(ids, d.pad(), left_pad=False).to(self.device)
        src = torch.cat([prompt.new_full((len(ids), 1), d.bos()), prompt], 1)
        sample = {"id": torch.arange(len(ids)),
                  "net_input": {"src_tokens": src, "src_lengths": torch.tensor([len(i) + 1 for i in ids])}}
        args = OmegaConf.structured(GenerationConfig(
            beam=sampling.beam, sampling=sampling.sample, temperature=sampling.temperature,
            sampling_topk=sampling.top_k or -1, sampling_topp=sampling.top_p if sampling.top_p < 1 else -1.0,
            max_len_a=1, max_len_b=max_new_tokens - 1, min_len=1))
        generator = self.task.build_generator([self.model], args)
        hypos = generator.generate([self.model], sample, prefix_tokens=prompt, bos_token=d.bos())
        outputs = []
        for i, beams in zip(ids, hypos):
            tokens = beams[0]["tokens"][len(i):].tolist()
            text = self.vocab.decode(tokens)
            stop = getattr(self.task.cfg, "stop_text", "")
            outputs.append(text[:text.find(stop) + len(stop)] if stop and stop in text else text)
        return outputs
