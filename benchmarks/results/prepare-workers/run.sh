#!/bin/bash
# The prepare stage's image workers against the stage before them (a worktree of the commit before), on this machine.
set -e
OLD=$1; NEW=$2; OUT=/tmp/pw/rec
echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) ($(nproc) cores); old = $(git -C $OLD rev-parse --short HEAD), new = $(git -C $NEW rev-parse --short HEAD) + the working tree"
echo "# 1) the captions split alone: python -m stages.prepare_data --source synthetic --split captions --out DIR [--workers N]"
for r in 1 2; do
  for v in old new1 new2; do
    case $v in old) d=$OLD; a="";; new1) d=$NEW; a="--workers 1";; new2) d=$NEW; a="--workers 2";; esac
    rm -rf $OUT/$v; s=$(date +%s.%N)
    (cd $d && .venv/bin/python -m stages.prepare_data --source synthetic --split captions --out $OUT/$v $a >/dev/null)
    echo "round $r captions $v: $(echo "$(date +%s.%N) - $s" | bc | cut -c1-5) s"
  done
  cmp -s $OUT/old/captions/instances-000000.tar $OUT/new2/captions/instances-000000.tar && diff -rq $OUT/old/captions $OUT/new2/captions && echo "round $r captions: old and new2 byte-identical"
done
echo "# 2) the five splits two at a time, as make repro runs its one-core stages (xargs -P2, in the order val, test, train, captions, captions_val); new with its default --workers 0 = one per core"
for r in 1 2 3; do
  for v in new old; do
    d=$([ $v = old ] && echo $OLD || echo $NEW); rm -rf $OUT/p-$v; s=$(date +%s.%N)
    printf "val\ntest\ntrain\ncaptions\ncaptions_val\n" | (cd $d && xargs -P2 -I{} .venv/bin/python -m stages.prepare_data --source synthetic --split {} --out $OUT/p-$v >/dev/null 2>&1)
    echo "round $r five splits $v: $(echo "$(date +%s.%N) - $s" | bc | cut -c1-5) s"
  done
  diff -rq $OUT/p-old $OUT/p-new && echo "round $r: every file of the five splits byte-identical"
done
