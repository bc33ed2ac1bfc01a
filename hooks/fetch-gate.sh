# shellcheck shell=sh
# gatekeeper's fetch-side check (gatekeeper/hooks/fetchgate.py), run by git upload-pack as
# uploadpack.packObjectsHook instead of `git pack-objects ARGS`:
#
#     /bin/sh fetch-gate.sh GIT REQUEST_FD ANSWER_FD git pack-objects ARGS...
#
# It asks the forced command, its grandparent, whether the read is still allowed
# (one line on REQUEST_FD) and packs only on a yes. The answer lines carry this
# process's id, so a line left over by an earlier hook is never taken as its own.
# A plain shell script, not Python: it runs on every clone and fetch.

git=$1 request=$2 answer=$3
shift 3
refuse() {
    echo "gatekeeper: access refused: internal error (logged on the server)." >&2
    exit 1
}
# Before refusing a pack: read what upload-pack writes us (the objects it wants), so
# it sees us exit rather than a broken pipe, which kills it before it passes our
# lines on to the client.
drain() {
    cat >/dev/null
}
# File descriptors 3-9 only: dash reads a single digit after >& and <&.
case $request:$answer in
    [3-9]:[3-9]) ;;
    *) refuse ;;
esac
case $git in
    /*) ;;
    *) refuse ;;
esac
if [ "$1" != git ] || [ "$2" != pack-objects ]; then
    refuse
fi
shift 2
printf 'pack %s\n' "$$" >&"$request" || { drain; refuse; }
while IFS= read -r line <&"$answer"; do
    case $line in
        "say $$ "*) printf '%s\n' "${line#"say $$ "}" >&2 ;;
        "ok $$")
            eval "exec $request>&- $answer<&-"
            exec "$git" pack-objects "$@"
            ;;
        "no $$")
            drain
            exit 1
            ;;
        *) ;; # an earlier hook's answer
    esac
done
drain
refuse # the forced command went away without an answer
