/*
 * bcryptprimitives.dll for Wine 8, which lacks it.
 *
 * Rust's standard library (1.78 and later) on Windows gets its random bytes from ProcessPrng in
 * bcryptprimitives.dll. Wine 8 (Debian 12's) has no such DLL, so a Rust program exits at once
 * (status 53, nothing printed) when it first needs randomness. This DLL gives ProcessPrng over
 * RtlGenRandom (advapi32's SystemFunction036), which Wine has. The test harness builds it with
 * `x86_64-w64-mingw32-gcc -shared -O2 -o bcryptprimitives.dll bcryptprimitives.c -ladvapi32` and
 * puts it beside the agent's .exe, where Windows' loader looks first. Test use only: real
 * Windows (10 and later) ships the real DLL.
 */
#include <windows.h>

/* RtlGenRandom: fills buf with len random bytes; TRUE on success. */
BOOLEAN WINAPI SystemFunction036(PVOID buf, ULONG len);

/* ProcessPrng: fills data with len random bytes; always TRUE on Windows, FALSE here on failure. */
__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
