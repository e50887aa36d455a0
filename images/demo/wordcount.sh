#!/bin/sh
# LabCloud demo tool: count the words of every file a job receives as data.
#
# Reads every file under /files/data (the entrypoint's data_ids folder), recursively,
# and writes /files/output/wordcount.txt with one line per file:
#     <path relative to /files/data> <number of words>
# sorted by path in byte order. Progress goes to stdout and to /files/log/wordcount.log,
# and as LABCLOUD_PROGRESS lines to stdout (docs/tools.md): the job shows the share
# of files done.
#
# WORDCOUNT_PATTERN (optional): a shell glob matched against each file's name, e.g.
# '*.txt'; files whose name does not match are skipped. Default: every file.
#
# File names may contain spaces; names containing a newline are not supported,
# since the list of files is read line by line.
set -eu

data_dir=/files/data
output_dir=/files/output
log_dir=/files/log
pattern=${WORDCOUNT_PATTERN:-*}

mkdir -p "$output_dir" "$log_dir"
result="$output_dir/wordcount.txt"
log_file="$log_dir/wordcount.log"
: >"$log_file"

say() {
    printf '%s\n' "$*"
    printf '%s\n' "$*" >>"$log_file"
}

# The result is written beside its final name and renamed when complete, so a
# failed run never leaves a truncated wordcount.txt behind.
partial="$result.partial"
: >"$partial"
file_list=$(mktemp)
trap 'rm -f "$file_list"' EXIT

if [ -d "$data_dir" ]; then
    find "$data_dir" -type f | LC_ALL=C sort >"$file_list"
else
    say "no input folder $data_dir: nothing to count"
fi

total=$(wc -l <"$file_list" | tr -d ' ')
say "counting words in $total file(s) under $data_dir (pattern: $pattern)"
echo "LABCLOUD_PROGRESS 0 counting words in $total file(s)"
counted=0
seen=0
while IFS= read -r path; do
    seen=$((seen + 1))
    # The share of files looked at, as a decimal fraction (integer shell arithmetic).
    permille=$((seen * 1000 / total))
    fraction=$(printf '%d.%03d' $((permille / 1000)) $((permille % 1000)))
    echo "LABCLOUD_PROGRESS $fraction ${path#"$data_dir"/}"
    name=${path##*/}
    # $pattern is unquoted on purpose: it is a glob to match, not a literal name.
    # shellcheck disable=SC2254
    case $name in
        $pattern) ;;
        *) continue ;;
    esac
    relative=${path#"$data_dir"/}
    words=$(wc -w <"$path" | tr -d ' ')
    printf '%s %s\n' "$relative" "$words" >>"$partial"
    counted=$((counted + 1))
    say "$relative: $words words"
done <"$file_list"

mv "$partial" "$result"
echo "LABCLOUD_PROGRESS 1 $counted file(s) counted"
say "done: $counted file(s) counted, result in $result"
