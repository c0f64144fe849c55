"""Chat templates rendered as transformers renders them, without transformers.

A chat template is Jinja2 source shipped with an LM's tokenizer. `render_chat_template` gives
the prompt string `PreTrainedTokenizer.apply_chat_template(..., tokenize=False)` gives: the same
sandboxed environment (`trim_blocks`, `lstrip_blocks`, the `loopcontrols` extension), the same
globals (`raise_exception`, `strftime_now`, `dict`, `namespace`), its `tojson` filter, and its
preparation of the messages (None-valued keys dropped, plain JSON data, reasoning aliases).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime

import numpy as np

# Names a message's reasoning goes under; templates read `reasoning_content` (or `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def render_chat_template(
    template: str,
    messages: Sequence[Mapping],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping] | None = None,
    documents: Sequence[Mapping] | None = None,
    **variables,
) -> str:
    """Render a chat template with transformers' inputs (its `render_jinja_template`).

    Messages lose keys whose value is None (templates test for a missing key, not for None) and
    become plain JSON data, so the sandbox never sees arbitrary objects (an image becomes
    "<Image>"); reasoning is copied under every name templates read it from.
    """
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        chat.append(_alias_reasoning({k: v for k, v in _plain(message).items() if v is not None}))
    return _compile_template(template).render(
        messages=chat,
        tools=_plain(tools),
        documents=_plain(documents),
        add_generation_prompt=add_generation_prompt,
        **_plain(variables),
    )


def _plain(value):
    """Rebuild `value` from JSON types (transformers' `_plain_template_data`, minus dataclasses)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):  # subclasses (enums, ...) lose their extra methods
        if isinstance(value, base):
            return base(value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
    return _chat_environment().from_string(template)


@functools.lru_cache(maxsize=1)
def _chat_environment():
    """The Jinja environment transformers renders chat templates in.

    Templates come from model repositories, so they run sandboxed, and the globals are
    transformers' own so that templates written for it render identically here.
    """
    import jinja2
    import jinja2.exceptions
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    version = tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < (3, 1, 6):  # older versions have known sandbox escapes
        raise ImportError(f"chat templates need jinja2>=3.1.6, found {jinja2.__version__}")

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for transformers'
        assistant masks; here it only renders its body, which is what transformers prints."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateDict:  # `dict(...)` without attribute access to the real type
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """A namespace refusing `_`-prefixed names, which could reach interpreter internals."""

        def __init__(*args, **kwargs):  # Jinja's own signature trick, so `self=` stays usable
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} not allowed")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        dict=TemplateDict(),
        namespace=TemplateNamespace,
    )
    return env
