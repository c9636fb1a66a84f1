#!/bin/sh
# Boot a small Debian guest (vmlinux via its PVH entry, busybox initramfs) on 2 vCPUs under
# TCG with QEMU's execlog plugin loaded, and switch the plugin's log on for a few short
# windows through the QEMU monitor. Not run by CI: see README.md beside this script.
# Usage: run-guest.sh WORKDIR [multi|single]   (WORKDIR holds vmlinux, busybox,
# libexeclog.so). multi (the default): one host thread per vCPU (MTTCG), whose lines can
# glue together; single: both vCPUs on one host thread (-accel tcg,thread=single): QEMU
# 7.2 with execlog crashed once under MTTCG after the firmware window, so the later
# windows were recorded this way.
set -eu
W=$(cd "$1" && pwd)
THREAD=${2:-multi}
cd "$W"
rm -rf initramfs && mkdir -p initramfs/bin initramfs/proc initramfs/sys initramfs/dev
cp busybox initramfs/bin/busybox
for tool in sh mount echo cat ls poweroff sleep uname dd; do ln -sf busybox initramfs/bin/$tool; done
cat > initramfs/init <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
echo "GUEST-USERSPACE-START"
cat /proc/cpuinfo > /dev/null
ls -l /proc/self/ > /dev/null
dd if=/dev/zero of=/dev/null bs=4096 count=64 2> /dev/null
echo "GUEST-USERSPACE-END"
poweroff -f
INIT
chmod +x initramfs/init
(cd initramfs && find . | ./bin/busybox cpio -o -H newc > ../init.cpio 2> /dev/null)

rm -f exec.log serial.log mon.sock
qemu-system-x86_64 -accel tcg,thread=$THREAD -smp 2 -m 256M -nographic -no-reboot -S \
    -kernel vmlinux -initrd init.cpio \
    -append "console=ttyS0 nokaslr panic=-1 rdinit=/init" \
    -plugin ./libexeclog.so -D exec.log \
    -monitor unix:mon.sock,server,nowait -serial file:serial.log &
QEMU=$!
while [ ! -S mon.sock ]; do sleep 0.1; done
mon() { python3 -c "
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect('mon.sock'); time.sleep(0.2)
s.sendall((sys.argv[1] + '\n').encode()); time.sleep(0.2); s.close()" "$1"; }
wait_for() { while ! grep -q "$1" serial.log 2> /dev/null; do sleep 0.2; done; }
# Window 1: the firmware (SeaBIOS from the pc.bios ROM), from the first instruction
# (multi only: a single-threaded run starts with the log off).
if [ "$THREAD" = multi ]; then mon "log plugin"; mon "cont"; sleep 0.5; mon "log none"
else mon "cont"; fi
# Window 2: the kernel, once both vCPUs are up.
wait_for "smp: Brought up 1 node, 2 CPUs"; mon "log plugin"; sleep 0.5; mon "log none"
# Window 3: busybox userspace.
wait_for "GUEST-USERSPACE-START"; mon "log plugin"; sleep 0.5; mon "log none"
wait $QEMU || true
ls -la exec.log serial.log
