#!/bin/sh
# gatekeeper's AuthorizedKeysCommand for sshd: `keys-command.sh %u %f`.
# Written by `gatekeeper keys-script`; do not edit (writing it again replaces it).
#
# sshd runs this twice for every connection (the key offered, then its signature), so
# it is a plain shell script that reads one file of the key index (gatekeeper/keyindex.py)
# and prints the authorized_keys line for it: no interpreter starts. Only for a key the
# index does not have (one added on another front-end of a shared store) does it hand
# over to `gatekeeper keys-command`, which reads the store. A stale entry grants
# nothing: the forced command accepts the key id only with the fingerprint sshd matched.
# gatekeeper-keys-script: 1
user=@USER@
index=@INDEX@
shell=@SHELL@
config=@CONFIG@
gatekeeper=@GATEKEEPER@

[ "$#" -eq 2 ] && [ "$1" = "$user" ] || exit 0
fp=$2
case $fp in
    SHA256:*) ;;
    *) exit 0 ;;
esac
rest=${fp#SHA256:}
# Unpadded base64 of a SHA-256: 43 characters, and nothing that could leave the index.
case $rest in
    *[!A-Za-z0-9+/]* | '') exit 0 ;;
esac
[ "${#rest}" -eq 43 ] || exit 0
name=SHA256_
while [ -n "$rest" ]; do
    tail=${rest#?}
    c=${rest%"$tail"}
    rest=$tail
    case $c in
        /) c=_ ;;
        +) c=- ;;
    esac
    name=$name$c
done
if IFS=' ' read -r id type blob factor extra <"$index/$name" 2>/dev/null; then
    [ -z "$extra" ] || exit 0
    case $id:$type:$blob in
        *[!A-Za-z0-9@.:+/=-]* | :* | *::* | *:) exit 0 ;;
    esac
    case $id in
        *[!0-9]*) exit 0 ;;
    esac
    options=restrict
    args=
    case $factor in
        touch) args=" --factor touch" ;;
        touch+pin)
            args=" --factor touch+pin"
            options=restrict,verify-required
            ;;
        - | '') ;;
        *) exit 0 ;;
    esac
    printf 'command="%s --config %s --key %s%s %s",%s %s %s\n' \
        "$shell" "$config" "$fp" "$args" "$id" "$options" "$type" "$blob"
    exit 0
fi
exec "$gatekeeper" --config "$config" keys-command "$user" "$fp"
