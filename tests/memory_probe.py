"""Prelude of the fresh-process memory probes: peak RSS (VmHWM) above a baseline taken by start()."""
import textwrap

PRELUDE = textwrap.dedent("""
    import gc, json, re, sys, torch
    from compact.memory import trim_host_memory
    def status():
        text = open("/proc/self/status").read()
        return {k: int(re.search(k + r":\\s+(\\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}
    def start():
        gc.collect()
        trim_host_memory()
        try:
            open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
        except OSError:
            pass
        return status()["VmRSS"]
""")
