package container

import (
	"testing"

	cmlv1 "github.com/cmlproject/cml/api/cml/v1"
)

// TestTransitions lists every move the state machine must allow and a
// selection it must refuse; any change to the table shows up here.
func TestTransitions(t *testing.T) {
	allow := map[[2]State]bool{
		{Stopped, Starting}: true, {Failed, Starting}: true,
		{Starting, Running}: true, {Starting, Failed}: true, {Starting, Stopped}: true,
		{Running, Freezing}: true, {Running, Stopping}: true, {Running, Stopped}: true, {Running, Failed}: true,
		{Freezing, Frozen}: true, {Freezing, Running}: true, {Freezing, Stopped}: true, {Freezing, Failed}: true,
		{Frozen, Running}: true, {Frozen, Stopping}: true, {Frozen, Stopped}: true, {Frozen, Failed}: true,
		{Stopping, Stopped}: true, {Stopping, Failed}: true,
	}
	all := []State{Stopped, Starting, Running, Freezing, Frozen, Stopping, Failed}
	for _, from := range all {
		for _, to := range all {
			if got, want := allowed(from, to), allow[[2]State{from, to}]; got != want {
				t.Errorf("%s -> %s: allowed %t, want %t", from, to, got, want)
			}
		}
	}
	if len(all) != len(cmlv1.ContainerState_name) {
		t.Errorf("the state machine covers %d states, the API has %d", len(all), len(cmlv1.ContainerState_name))
	}
}

// TestUpdateRefusesStaleWriters: an update for an older run generation,
// or for a removed container, changes nothing.
func TestUpdateRefusesStaleWriters(t *testing.T) {
	f := newFixture(t)
	f.create("a", "")
	c, _ := f.m.lookup("a")
	f.m.mu.Lock()
	c.state, c.gen = Running, 2
	f.m.mu.Unlock()
	if f.m.update(c, 1, Stopped, "stale exit") {
		t.Error("an exit of generation 1 overwrote generation 2's state")
	}
	if !f.m.update(c, 2, Frozen, "") == allowed(Running, Frozen) {
		t.Error("update disagrees with the transition table")
	}
	if !f.m.update(c, 2, Stopped, "exit") {
		t.Error("the current generation's exit was refused")
	}
	f.m.mu.Lock()
	c.removed = true
	f.m.mu.Unlock()
	if f.m.update(c, 0, Starting, "") {
		t.Error("a removed container changed state")
	}
}
