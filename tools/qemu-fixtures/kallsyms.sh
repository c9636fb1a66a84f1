#!/bin/sh
# Boot the guest of run-guest.sh (same kernel, same nokaslr command line, so the same
# symbol addresses) without the plugin, and print the /proc/kallsyms lines of the structures
# the fixtures protect, each with the next symbol (to derive its size), to kallsyms.txt.
# Usage: kallsyms.sh WORKDIR   (WORKDIR holds vmlinux and busybox)
set -eu
W=$(cd "$1" && pwd)
cd "$W"
rm -rf ksyms && mkdir -p ksyms/bin ksyms/proc
cp busybox ksyms/bin/busybox
for tool in sh mount grep poweroff; do ln -sf busybox ksyms/bin/$tool; done
cat > ksyms/init <<'INIT'
#!/bin/sh
mount -t proc proc /proc
echo KALLSYMS-BEGIN
grep -A1 -E ' (_text|sys_call_table|idt_table|init_cred|init_task|jiffies_64|init_mm|_stext)$' /proc/kallsyms
echo KALLSYMS-END
poweroff -f
INIT
chmod +x ksyms/init
(cd ksyms && find . | ./bin/busybox cpio -o -H newc > ../ksyms.cpio 2> /dev/null)
timeout 600 qemu-system-x86_64 -accel tcg -smp 2 -m 256M -nographic -no-reboot \
    -kernel vmlinux -initrd ksyms.cpio \
    -append "console=ttyS0 nokaslr panic=-1 rdinit=/init quiet" \
    -serial file:ksyms-serial.log -monitor none -display none || true
sed -n '/KALLSYMS-BEGIN/,/KALLSYMS-END/p' ksyms-serial.log | tr -d '\r' \
    | grep -v -e KALLSYMS -e '^--$' > kallsyms.txt
cat kallsyms.txt
