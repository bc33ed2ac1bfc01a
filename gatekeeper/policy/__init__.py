"""The YAML policy: who may read or write which repositories, and what level of
two-step verification each needs (docs/design.md).

- `model`: the policy as the decision reads it (`Policy`, teams, rules, settings);
- `check`: validation with line numbers, and compiling a valid file (yaml, re);
- `compiled`: the compiled cache the forced command reads;
- `load`: `load_policy`, the per-connection path through that cache.

Like gitolite's Conf.pm and Conf/Load.pm, the compile side (`check`) stays apart from
the runtime side. This file offers the runtime side, `model` and `load`, which the
forced command needs anyway; `check` is imported by whoever checks a file.
"""

from gatekeeper.policy.load import DEFAULT_CONFIG, default_config_path, load_policy
from gatekeeper.policy.model import (
    LEVELS,
    MODES,
    Policy,
    Problem,
    RepoRule,
    ServerSettings,
    Team,
    TwoFactorSettings,
    glob_match,
    glob_tokens,
)

__all__ = [
    "DEFAULT_CONFIG",
    "LEVELS",
    "MODES",
    "Policy",
    "Problem",
    "RepoRule",
    "ServerSettings",
    "Team",
    "TwoFactorSettings",
    "default_config_path",
    "glob_match",
    "glob_tokens",
    "load_policy",
]
