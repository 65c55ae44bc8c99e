package kubetest

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestCluster checks the harness itself: the real API server stores a Service, keeps it across
// a stop and start of the API server (etcd stays), and serves the same client afterwards.
func TestCluster(t *testing.T) {
	c := Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "kdpt-web", Namespace: "default"},
		Spec: corev1.ServiceSpec{
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}},
		},
	}
	got, err := c.Client.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service: %v", err)
	}
	if got.Spec.ClusterIP == "" {
		t.Fatalf("no ClusterIP allocated: %+v", got.Spec)
	}
	c.StopAPIServer()
	if _, err := c.Client.CoreV1().Services("default").Get(ctx, "kdpt-web", metav1.GetOptions{}); err == nil {
		t.Fatal("API server answered while stopped")
	}
	c.StartAPIServer()
	again, err := c.Client.CoreV1().Services("default").Get(ctx, "kdpt-web", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get after restart: %v", err)
	}
	if again.Spec.ClusterIP != got.Spec.ClusterIP {
		t.Fatalf("ClusterIP %s after restart, want %s", again.Spec.ClusterIP, got.Spec.ClusterIP)
	}
}
