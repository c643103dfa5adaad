"""EasyEdit edit requests, checked once: `prompt` containing `subject` (or a MEMIT "{}" template),
`subject`, and a non-empty `target_new` (a string, or ROME's {"str": ...})."""

from __future__ import annotations


def _name(request: dict, i: int) -> str:
    return f"request {i}" + (f" (case_id={request['case_id']})" if "case_id" in request else "")


def normalise_requests(requests, need_target: bool = True) -> list[dict]:
    """Copies of the requests with the subject filled into `prompt` and `target_new` a stripped string;
    ValueError naming the first bad request. Key capture needs no target (`need_target=False`)."""
    if isinstance(requests, dict):
        requests = [requests]
    out = []
    for i, r in enumerate(requests):
        if not isinstance(r, dict):
            raise ValueError(f"request {i} is not a dict: {r!r}")
        name = _name(r, i)
        prompt, subject, target = r.get("prompt"), r.get("subject"), r.get("target_new")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{name} has no prompt: {r!r}")
        if not isinstance(subject, str) or not subject:
            raise ValueError(f"{name} has no subject (MoTE needs `subject` to find the lookup token): prompt {prompt!r}")
        prompt = prompt.replace("{}", subject)
        if subject not in prompt:
            raise ValueError(f"{name}: subject {subject!r} not found in prompt {prompt!r}")
        target = target.get("str") if isinstance(target, dict) else target
        if need_target and (not isinstance(target, str) or not target.strip()):
            raise ValueError(f"{name} ({prompt!r}) has an empty target_new")
        out.append({**r, "prompt": prompt} | ({"target_new": target.strip()} if isinstance(target, str) else {}))
    return out
