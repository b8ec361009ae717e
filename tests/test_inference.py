"""The Python generation API's names: SpeechGPTGenerator (the old SpeechGPTModel still imports, with a warning)."""
import pytest


def test_old_names_import_with_a_deprecation_warning():
    from speechgpt_fairseq import inference
    from speechgpt_fairseq.models.generation import Decoding

    with pytest.warns(DeprecationWarning, match="SpeechGPTModel is now SpeechGPTGenerator"):
        from speechgpt_fairseq.inference import SpeechGPTModel
    assert SpeechGPTModel is inference.SpeechGPTGenerator
    with pytest.warns(DeprecationWarning, match="Sampling is now Decoding"):
        assert inference.Sampling is Decoding
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        inference.Nothing
