"""What the tests stand on, apart from the tests themselves: a real gatekeeper
installation (`installation`), a real OpenSSH server and client (`sshd`), the embedded
server (`served`), a throwaway PostgreSQL server and its pytest fixtures (`pgserver`,
`pgfixtures`), a software FIDO2 security key (`softkey`), one installation behind each
front-end (`fronts`), a throwaway system user (`asuser`), and the standard-library
references the light code is held to (`reference`). Not shipped: the wheel holds
`gatekeeper` only.
"""
