package main

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// pinThreads sets the CPU affinity of every thread of this process to cpu
// alone. A thread started later inherits the affinity of the thread that
// starts it, and so does a child process: once every thread is pinned, all
// that follows is. It repeats until a pass over /proc/self/task finds no
// thread it has not pinned yet (one started during the pass).
func pinThreads(cpu int) error {
	var set unix.CPUSet
	set.Set(cpu)
	pinned := make(map[int]bool)
	for range 20 {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return err
		}
		found := false
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil || pinned[tid] {
				continue
			}
			found = true
			if err := unix.SchedSetaffinity(tid, &set); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("pinning thread %d to CPU %d: %w", tid, cpu, err)
			}
			pinned[tid] = true
		}
		if !found {
			return nil
		}
	}
	return errors.New("threads keep starting while they are pinned")
}

// cpusAllowed lists the distinct Cpus_allowed_list values of a process's
// threads ("self" for this one): a single value when it is pinned.
func cpusAllowed(pid string) ([]string, error) {
	tasks, err := os.ReadDir("/proc/" + pid + "/task")
	if err != nil {
		return nil, err
	}
	var lists []string
	for _, t := range tasks {
		raw, err := os.ReadFile("/proc/" + pid + "/task/" + t.Name() + "/status")
		if err != nil {
			continue // the thread ended
		}
		for line := range strings.Lines(string(raw)) {
			if v, ok := strings.CutPrefix(line, "Cpus_allowed_list:"); ok {
				v = strings.TrimSpace(v)
				if !slices.Contains(lists, v) {
					lists = append(lists, v)
				}
			}
		}
	}
	slices.Sort(lists)
	return lists, nil
}

// cpuClock reads a process's CPU time, user and system, of all its threads,
// those ended included.
type cpuClock struct {
	pid int
	// ticks: from /proc/<pid>/stat, in 10 ms ticks, where the kernel's
	// process CPU clock (in nanoseconds) cannot be read.
	ticks bool
}

// newCPUClock prefers the process CPU clock (clock_gettime on
// MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED), the scheduler's runtime in
// nanoseconds) over /proc/<pid>/stat's utime and stime, which count 100 Hz
// ticks.
func newCPUClock(pid int) *cpuClock {
	c := &cpuClock{pid: pid}
	if _, err := c.read(); err != nil {
		c.ticks = true
	}
	return c
}

func (c *cpuClock) source() string {
	if c.ticks {
		return "utime+stime from /proc/<pid>/stat (100 Hz ticks)"
	}
	return "its process CPU clock (clock_gettime, ns)"
}

func (c *cpuClock) read() (time.Duration, error) {
	if !c.ticks {
		var ts unix.Timespec
		if err := unix.ClockGettime(int32((^c.pid)<<3|2), &ts); err != nil {
			return 0, err
		}
		return time.Duration(ts.Nano()), nil
	}
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", c.pid))
	if err != nil {
		return 0, err
	}
	s := string(raw)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(fields) < 13 {
		return 0, fmt.Errorf("short /proc/%d/stat", c.pid)
	}
	utime, err1 := strconv.ParseInt(fields[11], 10, 64)
	stime, err2 := strconv.ParseInt(fields[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return time.Duration(utime+stime) * (time.Second / ticksPerSecond), nil
}

// ticksPerSecond is the kernel's USER_HZ, 100 on Linux.
const ticksPerSecond = 100

// selfCPU is this process's CPU time, user and system.
func selfCPU() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
