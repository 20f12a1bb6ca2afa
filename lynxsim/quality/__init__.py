"""Measured routing quality: small MoE language models trained here, and policies applied inside their forward pass.

The simulator scores a policy by proxies (retained top-k mass, top-1 kept, ...) because it has no model outputs.
This package trains two small decoder-only MoE language models (a Mixtral-like 8-expert top-2 one and a
Qwen2-MoE-like 64-expert top-8 one with a shared expert), exports their router logits as routing traces, and
runs the very policy code the simulator uses (``lynxsim.policies``) on each decode batch's router logits inside
the forward pass, so that the change in next-token loss a policy causes can be set beside its proxies.

Only the modules that build or run a model import torch (``model``, ``train``, ``checkpoint``, ``routing_adapter``,
``evaluate``, ``traces``); ``shapes``, ``corpus``, ``points``, ``report`` and ``commands`` do not, so the simulator
and ``lynxsim --help`` work without torch (the ``gpu`` extra).
"""
