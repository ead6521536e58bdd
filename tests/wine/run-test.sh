#!/bin/sh
# cargo's runner for x86_64-pc-windows-gnu test executables: runs one under Wine with
# bcryptprimitives.dll (tests/wine/bcryptprimitives.c) beside it, in a Wine prefix of its own.
#   CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER=tests/wine/run-test.sh \
#     cargo test -p sa-core --lib --target x86_64-pc-windows-gnu
set -eu
exe=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
dir=$(dirname "$exe")
if [ ! -f "$dir/bcryptprimitives.dll" ] || [ "$here/bcryptprimitives.c" -nt "$dir/bcryptprimitives.dll" ]; then
  x86_64-w64-mingw32-gcc -shared -O2 -o "$dir/bcryptprimitives.dll" "$here/bcryptprimitives.c" -ladvapi32
fi
export WINEPREFIX="${SA_WINE_PREFIX:-$(dirname "$dir")/wine-prefix}" WINEDEBUG=-all
status=0
/usr/lib/wine/wine64 "$exe" "$@" || status=$?
/usr/lib/wine/wineserver -k 2>/dev/null || true
exit $status
