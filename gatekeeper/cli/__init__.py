"""The admin CLI, `gatekeeper ...`: thin click commands over the library functions.

`main` builds the group and renders every expected failure; `common` holds what every
command gets (the policy, the store, who ran it) and the printing helpers; each other
module is one command group: `store` (init, migrate, store copy), `users`, `keys`,
`twofa`, `policy` (policy check/install, check), `audit` (audit, log), `hooks`, `serve`.
Nothing here is imported on the per-connection path (sshd's keys-command goes to
`gatekeeper.authkeys` before click is imported: see `gatekeeper.entry`).
"""
