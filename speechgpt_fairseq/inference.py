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
from fairseq.dataclass.configs import GenerationConfig
from fairseq.dataclass.utils import merge_with_parent
from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY
from omegaconf import OmegaConf

from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.models.generation import prompt_batch


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
                 seed: int | None = None, min_new_tokens: int = 0) -> list[str]:
        """Continue each prompt text (e.g. ending with `[SpeechGPT]:`); return the generated texts without the
        prompt, ending with the task's stop text (`<eoa>`) when generation stopped there."""
        stop = getattr(self.task.cfg, "stop_text", "")
        outputs = []
        for ids in self.generate_ids([self.vocab.encode_prompt(p) for p in prompts], max_new_tokens, sampling, seed,
                                     min_new_tokens):
            text = self.vocab.decode(ids)
            outputs.append(text[:text.find(stop) + len(stop)] if stop and stop in text else text)
        return outputs

    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int = 512, sampling: Sampling = Sampling(),
                     seed: int | None = None, min_new_tokens: int = 0) -> list[list[int]]:
        """Continue prompts given as ids (bos first when the tokenizer adds one, as `vocab.encode_prompt` gives
        them); return the ids each generated, without the final `</s>`. At most `max_new_tokens`, and no eos among
        the first `min_new_tokens`."""
        if seed is not None:
            torch.manual_seed(seed)
        ids = [torch.tensor(p, dtype=torch.long) for p in prompts]
        src, first, forced = (t.to(self.device) for t in prompt_batch(ids, self.dictionary.pad()))
        sample = {"id": torch.arange(len(ids)),
                  "net_input": {"src_tokens": src, "src_lengths": torch.tensor([len(i) for i in ids])}}
        args = OmegaConf.structured(GenerationConfig(
            beam=sampling.beam, sampling=sampling.sample, temperature=sampling.temperature,
            sampling_topk=sampling.top_k or -1, sampling_topp=sampling.top_p if sampling.top_p < 1 else -1.0,
            max_len_a=1, max_len_b=max_new_tokens - 1, min_len=0))
        generator = self.task.build_generator([self.model], args,
                                              extra_gen_cls_kwargs={"min_new_tokens": min_new_tokens})
        hypos = generator.generate([self.model], sample, prefix_tokens=forced, bos_token=first)
        outputs = []
        for prompt, beams in zip(ids, hypos):
            tokens = beams[0]["tokens"][len(prompt) - 1:].tolist()  # after the forced part of the prompt
            outputs.append(tokens[:-1] if tokens and tokens[-1] == self.vocab.eos else tokens)
        return outputs
