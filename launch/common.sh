# Sourced by the shell launchers (multi_gpu.sh, tpu_vm.sh).

# check_main_args ARGS...: ARGS must be "--" followed by fp_jax.main arguments, none of them a
# distributed flag (the launcher sets those). Otherwise one `error:` line and exit status 2.
check_main_args() {
  [[ ${1:-} == "--" ]] || { echo "error: put the fp_jax.main arguments after --" >&2; exit 2; }
  shift
  [[ $# -gt 0 ]] || { echo "error: no fp_jax.main arguments after --" >&2; exit 2; }
  local a
  for a in "$@"; do
    case $a in
      --coordinator_address*|--num_processes*|--process_id*)
        echo "error: $a is set by this launcher" >&2; exit 2 ;;
    esac
  done
}
