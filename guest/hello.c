/* hello: prints a greeting and exits through isa-debug-exit with the value of
 * `exit=N` on the command line (default 0): one binary tests many exit codes. */
#include "lib.h"

int guest_main(void)
{
	u64 code = cmdline_num("exit", 0);
	kprintf("hello: hello world (entry %s)\n", boot.entry);
	kprintf("hello: cmdline \"%s\"\n", boot.cmdline);
	kprintf("hello: exit %lu\n", code);
	return (int)code;
}
