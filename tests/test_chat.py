"""Chat templates: the families' templates render as transformers renders them; a template
that reaches for Python internals fails safely."""
from __future__ import annotations

import pytest

from ggforge.runtime.chat import ChatTemplate, ChatTemplateError
from tokenizer_factory import make_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?  \n"}],
]


@pytest.mark.parametrize("kind", ["llama2-spm", "gemma3-spm", "llama3-bpe", "qwen2-bpe", "smollm-bpe"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_family_templates_render_like_transformers(kind, conv, tmp_path):
    import transformers

    make_tokenizer(kind, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = CONVERSATIONS[conv]
    try:
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template itself refuses (e.g. roles must alternate)
        with pytest.raises(ChatTemplateError):
            ChatTemplate(hf.chat_template, bos_token=hf.bos_token or "", eos_token=hf.eos_token or "").render(messages)
        pytest.skip(f"template refuses this conversation: {e}")
    got = ChatTemplate(hf.chat_template, bos_token=hf.bos_token or "",
                       eos_token=hf.eos_token or "").render(messages)
    assert got == want


PAYLOADS = [
    # CVE-2024-34359: reach os.popen through an object's class hierarchy
    "{% for c in [].__class__.__base__.__subclasses__() %}{% if c.__name__ == 'catch_warnings' %}"
    "{{ c()._module.__builtins__['__import__']('os').popen('touch /tmp/ggforge-pwned').read() }}"
    "{% endif %}{% endfor %}",
    "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch /tmp/ggforge-pwned') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append('x') }}",  # the environment is immutable
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_template_reaching_python_internals_fails_safely(payload, tmp_path):
    import os

    marker = "/tmp/ggforge-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    with pytest.raises(ChatTemplateError):
        ChatTemplate(payload).render([{"role": "user", "content": "hi"}])
    assert not os.path.exists(marker)


def test_missing_and_broken_templates():
    with pytest.raises(ChatTemplateError, match="no tokenizer.chat_template"):
        ChatTemplate.from_metadata({})
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")
    with pytest.raises(ChatTemplateError, match="refused"):
        ChatTemplate("{{ raise_exception('roles must alternate') }}").render([])
