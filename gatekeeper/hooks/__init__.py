"""Git hooks: the repository itself re-checks every push and fetch (defence in depth).

Even if a repository is reached by a path that skipped the forced command, or the
policy changed between connection and push, the repository checks again with the
same `decision.decide()` and answers with the same wording, as `remote:` lines.

Identity. When the forced command allows a git request it records a random
per-connection token in the store, bound to (user, key, repository, action, expiry),
in the same transaction as the access record, and hands it to git as
`GATEKEEPER_TOKEN` beside `GATEKEEPER_USER` and `GATEKEEPER_KEY`. Only the token's
SHA-256 is stored. A hook believes `GATEKEEPER_USER` only when the token is in the
store, unexpired, and names that user, that key, this repository and this action;
then it reads the key's 2FA state again and decides afresh. A push with no identity
at all (a local `git push` into the bare repository) is refused unless the policy
says `hooks: {allow_local_push: true}`; a push that claims an identity it cannot
prove (a forged `GATEKEEPER_USER`, an unknown or expired token) is always refused.

Push side: `hooks/pre-receive`, a thin shell script written from
the top-level `hooks/pre-receive.tmpl` with the installing interpreter's absolute path and the
policy file baked in (never found through PATH), and a marker line by which
`gatekeeper hooks` knows its own scripts. For a push over SSH it hands the ref
updates to the forced command, which is receive-pack's parent and runs `PushCheck`
itself (pushgate.py: no second interpreter); otherwise it runs `python -I -m
gatekeeper.hooks pre-receive`. Either way one `PushCheck` reads all ref updates,
makes one decision, checks every ref name
(git's `check-ref-format` rules, control characters first), runs a chained
`pre-receive.legacy` if there is one (after gatekeeper has allowed the push, so a
refused push never reaches it; its failure refuses the push), then writes one audit
record per ref update (ref, old, new) in a single `BEGIN IMMEDIATE` transaction: all
of them or none. If the store stays locked past its busy timeout the whole push is
refused, with nothing recorded and nothing changed.

Fetch side: git's `uploadpack.packObjectsHook`, chosen over a wrapper around
upload-pack. git honours that setting only from protected configuration (system,
global, or the command line), never from a repository's own config, so the forced
command passes it on upload-pack's command line (`git -c ...`): nothing to install,
and a repository cannot switch it off. upload-pack then runs the hook instead of
`git pack-objects ARGS`, and the hook re-checks the read (`check_fetch`) before it
execs `git pack-objects ARGS`. Over SSH the hook is a shell script that asks the
forced command, which stays alive as upload-pack's parent and answers with the same
`check_fetch` for the identity it already knows (fetchgate.py): no second interpreter
per clone. Where that cannot be set up (see fetchgate.py) the hook is
`python -I -m gatekeeper.hooks pack-objects ...`, which proves the identity from the
token as pre-receive does. A wrapper around upload-pack would have to re-implement or
proxy the pack protocol to run at the same moment.
Limits: the check runs when objects are packed, so the ref advertisement (names and
ids of refs; all of `git ls-remote`) is still answered on the connection-time
decision; `git upload-archive` has no such hook and relies on the forced command
alone; a refused fetch also shows git's own "git-pack-objects died" lines after ours.

Other limits: a token is a bearer secret in git's environment for its lifetime
(`shell.HOOK_TOKEN_SECONDS`), visible to other hooks that run in the same push; anyone
who can already write the repository's files as the git user is beyond any hook.
`core.hooksPath` set in a repository makes git ignore `hooks/`, so installing there
is refused; set in the git user's global or the system config it would silence the
hooks of every repository, which `hooks status` cannot see.

The package, one module per part (this file imports none of them: the fetch hook
runs on every clone and loads only what it uses):

- `recheck`: what both hooks share: load, decide again, refuse and audit;
- `identity`: who is pushing or fetching, proven by the connection's token;
- `prereceive`: the push check (`PushCheck`) and the pre-receive hook;
- `fetch`: the fetch check and the pack-objects hook;
- `fetchgate`, `pushgate`: the forced command answering those checks itself;
- `install`: `gatekeeper hooks install|uninstall|status` (the click skin is in the CLI);
- `__main__`: `python -I -m gatekeeper.hooks pre-receive|pack-objects ...`, what git runs.

They import only the standard library and gatekeeper's light modules.
"""
