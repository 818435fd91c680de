package proc

import (
	"os"
	"os/exec"
	"testing"
	"time"
)

func TestStartTime(t *testing.T) {
	st, exited, err := StartTime(os.Getpid())
	if err != nil || exited || st == 0 {
		t.Fatalf("StartTime(self) = %d, %v, %v", st, exited, err)
	}
	if _, _, err := StartTime(1 << 30); err == nil {
		t.Error("StartTime of a missing process succeeded")
	}
	// A child that exited but is not reaped yet is a zombie: exited.
	cmd := exec.Command("true")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(time.Millisecond) {
		_, exited, err := StartTime(cmd.Process.Pid)
		if err != nil {
			t.Fatal(err)
		}
		if exited {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a child that exited is not reported as exited")
		}
	}
}

func TestComm(t *testing.T) {
	if got := Comm(os.Getpid()); got == "" || len(got) > 15 {
		t.Errorf("Comm(self) = %q", got)
	}
	if got := Comm(1 << 30); got != "" {
		t.Errorf("Comm of a missing process = %q", got)
	}
}
