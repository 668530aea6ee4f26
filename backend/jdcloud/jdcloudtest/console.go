package jdcloudtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/vmexportfs/vmexportfs/backend/jdcloud"
)

// Console calls the simulator's API the way JD Cloud's console does for a
// user (signed requests), to make images and exports behind a client's
// back.
type Console struct {
	s     *Server
	creds jdcloud.Credentials
	http  *http.Client
}

// Console signs with the secret of accessKey.
func (s *Server) Console(accessKey string) *Console {
	return &Console{s: s, creds: jdcloud.Credentials{AccessKey: accessKey, SecretKey: s.opts.Credentials[accessKey]},
		http: &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: s.CAPool()}}}}
}

// Call sends one signed request (body as JSON when not nil) and decodes its
// result into out.
func (c *Console) Call(ctx context.Context, method, route string, body, out any) error {
	var payload []byte
	if body != nil {
		var err error
		if payload, err = json.Marshal(body); err != nil {
			return err
		}
	}
	req, err := http.NewRequestWithContext(ctx, method, c.s.URL()+"/v1/regions/"+c.s.Region()+"/"+route, bytes.NewReader(payload))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	if err := jdcloud.Sign(req, payload, c.creds, c.s.Region(), "vm", time.Now().UTC(), rand.Text()); err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = jdcloud.Decode(resp.Body, resp.StatusCode, out)
	return err
}

// Export makes an image of the instance named name, exports it to ossURL
// under prefix, and waits (polling, as a user would) for both.
func (c *Console) Export(ctx context.Context, instance, name, ossURL, prefix string) error {
	var img jdcloud.CreateImageResult
	if err := c.Call(ctx, http.MethodPost, "instances/"+instance+":createImage", jdcloud.CreateImageRequest{Name: name}, &img); err != nil {
		return fmt.Errorf("createImage: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	wait := func(done func() (bool, error)) error {
		for {
			ok, err := done()
			if ok || err != nil {
				return err
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
	if err := wait(func() (bool, error) {
		var d jdcloud.DescribeImageResult
		err := c.Call(ctx, http.MethodGet, "images/"+img.ImageID, nil, &d)
		return err == nil && d.Image.Status == jdcloud.ImageReady, err
	}); err != nil {
		return fmt.Errorf("image %s: %w", img.ImageID, err)
	}
	var ex jdcloud.ExportImageResult
	req := jdcloud.ExportImageRequest{RoleName: "console", OSSURL: ossURL, OSSPrefix: prefix}
	if err := c.Call(ctx, http.MethodPost, "images/"+img.ImageID+":exportImage", req, &ex); err != nil {
		return fmt.Errorf("exportImage: %w", err)
	}
	return wait(func() (bool, error) {
		var ts jdcloud.ImageTasksResult
		err := c.Call(ctx, http.MethodGet, "imageTasks?pageNumber=1&pageSize=10&taskAction=ExportImage&taskIds.1="+string(ex.TaskID), nil, &ts)
		if err == nil && len(ts.TaskSet) == 1 && ts.TaskSet[0].TaskStatus == jdcloud.TaskFailed {
			return false, fmt.Errorf("export %s failed: %s", ex.TaskID, ts.TaskSet[0].ErrorInfo)
		}
		return err == nil && len(ts.TaskSet) == 1 && ts.TaskSet[0].TaskStatus == jdcloud.TaskFinished, err
	})
}
