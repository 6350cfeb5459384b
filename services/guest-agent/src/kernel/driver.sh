# Capsa shell kernel driver, embedded in the guest agent and run as `bash -c`.
#
# Protocol (the agent's side is in kernel/shell.rs):
#   fd 0  /dev/null;  fd 1/2  user stdout/stderr as raw bytes
#   fd 3  requests, agent -> driver, one line each:
#           "run <file>"  source <file> (written by the agent) in this shell
#           "env <file>"  source <file> of `export K='v'` lines (session env)
#   fd 4  events, driver -> agent: "done <status> <start> <end>" after each run, with
#         $EPOCHREALTIME around the code.
# Interrupt: the agent sends SIGINT to the kernel's process group. A foreground child dies of
# it; bash itself runs the INT trap, which only raises a flag and arms a DEBUG trap. With
# extdebug, a DEBUG trap returning 2 inside a function or sourced file skips the next command
# and returns from it, so the flag unwinds every level of user code back to the loop below.
# (Returning straight from the INT trap was tried: after interrupting a foreground `sleep`,
# bash was left with SIGCHLD blocked and never ran the INT trap again.) Outside a run the
# trap does nothing, so a late SIGINT cannot end the read loop.
shopt -s expand_aliases
set -T
shopt -s extdebug
__capsa_running=
__capsa_intr=
__capsa_unwind() {
  # Called as the DEBUG trap: FUNCNAME[0] is this function, [1] the user code's frame.
  if [[ -n $__capsa_intr ]] && (( ${#FUNCNAME[@]} > 1 )); then return 2; fi
  return 0
}
__capsa_on_int='if [[ -n $__capsa_running ]]; then __capsa_intr=1; trap __capsa_unwind DEBUG; fi'
trap "$__capsa_on_int" INT
__capsa_run() {
  __capsa_running=1
  source "$1"
}
while :; do
  IFS= read -r -u 3 __capsa_req
  __capsa_rc=$?
  if (( __capsa_rc > 128 )); then continue; fi   # read interrupted by a signal
  if (( __capsa_rc != 0 )); then exit 0; fi       # the agent is gone
  case $__capsa_req in
    "run "*)
      trap "$__capsa_on_int" INT   # user code may have replaced it last time
      __capsa_t0=$EPOCHREALTIME
      # User code sees neither control fd.
      __capsa_run "${__capsa_req#run }" 3<&- 4>&-
      __capsa_rc=$?
      __capsa_running=
      trap - DEBUG
      if [[ -n $__capsa_intr ]]; then __capsa_rc=130; __capsa_intr=; fi
      printf 'done %d %s %s\n' "$__capsa_rc" "$__capsa_t0" "$EPOCHREALTIME" >&4
      ;;
    "env "*)
      source "${__capsa_req#env }"
      ;;
  esac
done
