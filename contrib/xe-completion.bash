# bash completion for Corral's xe. Install as /etc/bash_completion.d/xe (or
# source it). Commands and their parameters come from the server itself
# (`xe help --minimal`, `xe help <command>`), so completion follows whatever
# the connected Corral version supports; uuids come from `<class>-list`.

_xe_help_params() {
    # "reqd params     : a, b" and "optional params : c" lines of `xe help <cmd>`.
    xe help "$1" 2>/dev/null | sed -n 's/^ *\(reqd\|optional\) params *: *//p' | tr ',' '\n' | sed 's/^ *//;/^$/d'
}

_xe() {
    local cur="${COMP_WORDS[COMP_CWORD]}"
    local cmd="${COMP_WORDS[1]}"
    COMPREPLY=()
    if [ "$COMP_CWORD" -eq 1 ]; then
        local cmds
        cmds=$(xe help --minimal 2>/dev/null | tr ',' ' ')
        COMPREPLY=($(compgen -W "$cmds" -- "$cur"))
        return 0
    fi
    # bash splits "a=b" at '=' when COMP_WORDBREAKS has it; join it back.
    local prev="${COMP_WORDS[COMP_CWORD-1]}"
    local param value
    if [ "$cur" = "=" ]; then
        param="$prev"; value=""
    elif [ "$prev" = "=" ] && [ "$COMP_CWORD" -ge 2 ]; then
        param="${COMP_WORDS[COMP_CWORD-2]}"; value="$cur"
    elif [[ "$cur" == *=* ]]; then
        param="${cur%%=*}"; value="${cur#*=}"
    fi
    if [ -n "$param" ]; then
        local class=""
        case "$param" in
            uuid) class="${cmd%%-*}" ;;
            *-uuid) class="${param%-uuid}" ;;
        esac
        if [ -n "$class" ]; then
            local uuids
            uuids=$(xe "$class-list" --minimal params=uuid 2>/dev/null | tr ',' ' ')
            local words=($(compgen -W "$uuids" -- "$value"))
            if [[ "$cur" == *=* ]]; then
                COMPREPLY=("${words[@]/#/$param=}")
            else
                COMPREPLY=("${words[@]}")
            fi
        fi
        return 0
    fi
    local params
    params=$(_xe_help_params "$cmd" | sed 's/$/=/')
    case "$cmd" in
        *-list) params="$params params= --minimal" ;;
    esac
    COMPREPLY=($(compgen -W "$params" -- "$cur"))
    compopt -o nospace 2>/dev/null
    return 0
}

complete -F _xe xe
