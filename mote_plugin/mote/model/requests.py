"""EasyEdit edit requests, checked once: `prompt` containing `subject` (or a MEMIT "{}" template),
`subject`, and a non-empty `target_new` (a string, or ROME's {"str": ...}).

Duplicates and conflicts in one batch (edit requests, `need_target=True`):
  * the same (prompt, subject, target_new) more than once is one edit: later copies are dropped (keeping them
    would only give that fact more weight in the least-squares solve);
  * the same (prompt, subject) with different targets is a conflict: ValueError naming the subject and the targets,
    before any weight changes. The same subject with other prompts (other relations) is not a conflict.
"""

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
            raise ValueError(f"{name} has no subject (MoTE needs `subject` to find the lookup token): prompt "
                             f"{prompt!r}")
        prompt = prompt.replace("{}", subject)
        if subject not in prompt:
            raise ValueError(f"{name}: subject {subject!r} not found in prompt {prompt!r}")
        target = target.get("str") if isinstance(target, dict) else target
        if need_target and (not isinstance(target, str) or not target.strip()):
            raise ValueError(f"{name} ({prompt!r}) has an empty target_new")
        out.append({**r, "prompt": prompt} | ({"target_new": target.strip()} if isinstance(target, str) else {}))
    return _without_duplicates(out) if need_target else out


def _without_duplicates(requests: list[dict]) -> list[dict]:
    seen: dict[tuple[str, str], str] = {}
    out = []
    for r in requests:
        key = (r["prompt"], r["subject"])
        if key in seen:
            if seen[key] != r["target_new"]:
                raise ValueError(f"conflicting requests for subject {r['subject']!r} in prompt {r['prompt']!r}: "
                                 f"target_new {seen[key]!r} and {r['target_new']!r}; edit one of them (or in separate "
                                 "batches)")
            continue
        seen[key] = r["target_new"]
        out.append(r)
    return out
